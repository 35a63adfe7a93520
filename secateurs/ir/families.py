"""The channel algebra of op families, written once for both dialects.

A family says how channels flow through every op of its kind: broadcasting elementwise ops, batched matrix
products (and attention's products of two activations), fused attention, linear layers, convolutions with groups, layer / RMS /
group norms, reductions, pooling and padding, row-major reshapes, permutations, broadcasts to a bigger shape,
tiling, concatenation and splitting, slices, lookups and gathers by index, and ops over positions.
The ATen rules (:mod:`secateurs.ir.aten_rules`) and the ONNX rules (:mod:`secateurs.ir.onnx_rules`) decode a
node onto a family (its operands, axis, permutation) and add only what their dialect has besides: literal size
vectors in ONNX, parameter consumers in ATen.

The functions work against the small protocol every :class:`~secateurs.ir.rules.RuleContext` offers (``shape``,
``dims``, ``unify``, ``unify_dims``, ``same_dims``, ``broadcast``, ``product``, ``concat``, ``split``, ``new``,
``mark``, ``tag``, ``mixes``, ``freeze``, ``freeze_value``, ``is_activation``); values are whatever the
dialect's context keys (FX nodes, onnx-ir values). This module imports neither torch nor onnx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from secateurs.errors import UnsupportedOpError

if TYPE_CHECKING:
    from secateurs.ir.rules import RuleContext, Shape

__all__ = ["along_dims", "attention", "attention_product", "axis", "broadcast_to", "clamp_bound", "concat", "conv", "elementwise",
           "gather", "group_norm", "index_block", "leading", "linear", "matmul", "normalise_over", "per_channel_norm", "permute", "reduce", "reshape",
           "reshape_runs", "same_sizes", "slice_along", "split", "static_shape", "strided_slice", "take_along",
           "tile"]


def axis(d: int, rank: int) -> int:
    """A possibly negative axis as an index into ``rank`` dims."""
    return d + rank if d < 0 else d


def static_shape(ctx: RuleContext, value: Any) -> Shape:
    """The static shape of ``value``.

    Raises:
        UnsupportedOpError: It has none (the analysis then freezes the node's channels and reports it).

    """
    shape = ctx.shape(value)
    if shape is None:
        name = getattr(value, "name", value)
        raise UnsupportedOpError(f"{ctx.where()}: value {name!r} has no static shape")
    return shape


def elementwise(ctx: RuleContext, outs: Sequence[Any], inputs: Sequence[Any], *,
                normalises: tuple[Any, int] | None = None) -> None:
    """Broadcasting op: every non-broadcast input dim is the same channels as the output dim.

    ``normalises=(x, axis)``: the op normalises ``x`` along ``axis`` (softmax), so the channels there mix but
    keep their identity.
    """
    for out in outs:
        ctx.broadcast(out, inputs)
    if normalises is not None:
        x, d = normalises
        rank = len(static_shape(ctx, x))
        if rank:
            ctx.mixes([ctx.dims(x)[axis(d, rank)]])


def matmul(ctx: RuleContext, a: Any, b: Any, out: Any) -> None:
    """Batched matrix product: ``a[..., k] ~ b[..., k, :]``; rows of ``a`` and columns of ``b`` pass through.

    Vector operands contract their one dim; batch dims shared with the output (not broadcast) pass through.
    """
    sa, sb, so = static_shape(ctx, a), static_shape(ctx, b), static_shape(ctx, out)
    if len(sa) == 1 or len(sb) == 1:
        if len(sa) == 1 and len(sb) == 1:
            ctx.unify_dims(a, 0, b, 0)
            return
        if len(sa) == 1:
            ctx.unify_dims(a, 0, b, -2)
            for i in range(len(so)):
                ctx.unify_dims(out, i, b, i if i < len(sb) - 2 else len(sb) - 1)
        else:
            ctx.unify_dims(a, -1, b, 0)
            for i in range(len(so)):
                ctx.unify_dims(out, i, a, i)
        return
    ctx.unify_dims(a, -1, b, -2)
    ctx.unify_dims(a, -2, out, -2)
    ctx.unify_dims(b, -1, out, -1)
    batch = so[:-2]
    for shape, value in ((sa[:-2], a), (sb[:-2], b)):
        offset = len(batch) - len(shape)
        for i, s in enumerate(shape):
            if s == batch[offset + i]:
                ctx.unify_dims(value, i, out, offset + i)


def linear(ctx: RuleContext, x: Any, w: Any, out: Any, bias: Any | None = None, *, x_in: int = -1,
           w_in: int = 1) -> None:
    """``y = x W^T + b`` (a linear layer, ONNX's Gemm): ``x[x_in] ~ W[w_in]``, ``W``'s other dim ~ ``y[..., -1]``.

    ``W`` is a matrix; the other dims of ``x`` pass through to ``y``'s leading dims in order (Gemm's ``transA``
    is ``x_in=0``, ``transB=0`` is ``w_in=0``). ``bias`` broadcasts to ``y``.
    """
    rank = len(static_shape(ctx, x))
    x_in, w_in = axis(x_in, rank), axis(w_in, 2)
    ctx.unify_dims(x, x_in, w, w_in)
    ctx.unify_dims(w, 1 - w_in, out, -1)
    for j, i in enumerate(i for i in range(rank) if i != x_in):
        ctx.unify_dims(x, i, out, j)
    if bias is not None:
        ctx.broadcast(out, [bias])


def attention_product(ctx: RuleContext, a: Any, b: Any, out: Any) -> bool:
    """Freeze ``head_dim`` when a matrix product multiplies two activations (attention's ``q k^T`` or ``p v``).

    The last dims of both operands (``head_dim`` of q and of v) are frozen, as for a fused attention op: pruning
    them changes the softmax scale and rotary embeddings. With rank >= 4 the dim before the last two is the
    heads dim. Returns whether the product was one of two activations.
    """
    if not (ctx.is_activation(a) and ctx.is_activation(b)):
        return False
    sa, sb, so = static_shape(ctx, a), static_shape(ctx, b), static_shape(ctx, out)
    if len(sa) >= 3 and len(sb) >= 3:
        ctx.freeze([ctx.dims(a)[-1], ctx.dims(b)[-1]], "attention head_dim (product of two activations)")
        if len(so) >= 4:
            ctx.tag([ctx.dims(out)[-3]], "heads")
    return True


def attention(ctx: RuleContext, q: Any, k: Any, v: Any, out: Any, mask: Any | None = None) -> None:
    """Fused attention ``softmax(q k^T) v`` over heads (``[..., heads, seq, head_dim]`` operands).

    Heads (and batch) are shared by q, k, v and the output; with grouped-query attention (fewer key / value heads
    than query heads) the query heads are the product (kv heads x queries per kv head), tagged ``kv_groups`` and
    ``heads``. The head dimension is frozen: pruning it changes the default softmax scale and rotary embeddings.
    A mask broadcasts over the scores ``[..., q_seq, k_seq]``.
    """
    sq, sk, so = static_shape(ctx, q), static_shape(ctx, k), static_shape(ctx, out)
    static_shape(ctx, v)
    ctx.unify_dims(q, -2, out, -2)
    ctx.unify_dims(k, -2, v, -2)
    ctx.unify_dims(q, -1, k, -1)
    ctx.unify_dims(v, -1, out, -1)
    ctx.freeze([ctx.dims(q)[-1], ctx.dims(v)[-1]], "attention head_dim (changes softmax scale / rotary)")
    rank = len(sq)
    for i in range(rank - 2):
        ctx.unify_dims(q, i, out, i)
        if sk[i] == sq[i]:
            ctx.unify_dims(q, i, k, i)
            ctx.unify_dims(q, i, v, i)
            if i == rank - 3:
                ctx.tag([ctx.dims(q)[i]], "heads")
        elif i == rank - 3 and sk[i] and sq[i] % sk[i] == 0:
            group = ctx.new(sq[i] // sk[i])
            ctx.unify(ctx.dims(q)[i], ctx.product([ctx.dims(k)[i], group]))
            ctx.unify_dims(k, i, v, i)
            ctx.tag([ctx.dims(k)[i]], "kv_groups")
            ctx.tag([group], "heads")
            ctx.tag([group], "copies")
        else:
            ctx.freeze([ctx.dims(q)[i], ctx.dims(k)[i], ctx.dims(v)[i]], "attention batch dims do not match")
    ms = ctx.shape(mask) if mask is not None else None
    if ms:
        offset = rank - len(ms)
        if ms[-1] == sk[-2]:
            ctx.unify_dims(mask, -1, k, -2)
        for i in range(len(ms) - 1):
            if ms[i] == so[offset + i]:
                ctx.unify_dims(mask, i, out, offset + i)


def conv(ctx: RuleContext, x: Any, w: Any, out: Any, bias: Any | None, *, groups: int, transposed: bool) -> int:
    """Convolution with groups: channels are ``groups x per_group`` on both sides; returns the groups atom.

    Conv: input C = G x Ci ~ weight dim 1 (Ci); weight dim 0 = G x Co ~ output C ~ bias. Transposed: the weight
    is [C_in, C_out / G, ...]. An unbatched input has its channels first. Kernel dims are frozen; the spatial
    output dims are computed by the op (left unlinked, so frozen).
    """
    sx, sw = static_shape(ctx, x), static_shape(ctx, w)
    cdim = 1 if len(sx) == len(sw) else 0
    if cdim:
        ctx.unify_dims(x, 0, out, 0)
    g = ctx.new(groups)
    if transposed:
        ci, co = ctx.new(sw[0] // groups), ctx.new(sw[1])
        ctx.unify(ctx.dims(x)[cdim], ctx.product([g, ci]))
        ctx.unify(ctx.dims(w)[0], ctx.product([g, ci]))
        ctx.unify(ctx.dims(w)[1], co)
        ctx.unify(ctx.dims(out)[cdim], ctx.product([g, co]))
    else:
        ci, co = ctx.new(sw[1]), ctx.new(sw[0] // groups)
        ctx.unify(ctx.dims(x)[cdim], ctx.product([g, ci]))
        ctx.unify(ctx.dims(w)[1], ci)
        ctx.unify(ctx.dims(w)[0], ctx.product([g, co]))
        ctx.unify(ctx.dims(out)[cdim], ctx.dims(w)[0])
    if bias is not None:
        ctx.unify_dims(bias, 0, out, cdim)
    ctx.freeze(ctx.dims(w)[2:], "kernel window", channel=False)
    return g


def per_channel_norm(ctx: RuleContext, x: Any, out: Any, params: Sequence[Any], stats: Sequence[Any], *,
                     instance: bool = False) -> None:
    """Batch / instance norm: channels on dim 1 (dim 0 for a vector) pass through, each normalised on its own.

    ``params`` (scale, bias, running statistics) and the 1-d ``stats`` outputs of the channels' size follow
    the channels, other ``stats`` are frozen; ``instance``: the statistics run over every dim after the
    channels, so those mix.
    """
    sx = static_shape(ctx, x)
    cdim = 1 if len(sx) > 1 else 0
    ctx.same_dims(x, out)
    if instance:
        ctx.mixes(ctx.dims(x)[2:])
    for p in params:
        if len(static_shape(ctx, p)) == 1:
            ctx.unify_dims(p, 0, x, cdim)
    for v in stats:
        shape = static_shape(ctx, v)
        if len(shape) == 1 and shape[0] == sx[cdim]:
            ctx.unify_dims(v, 0, x, cdim)
        else:
            ctx.freeze_value(v, "batch-norm statistics output")


def normalise_over(ctx: RuleContext, x: Any, out: Any, affine: Sequence[Any], d: int) -> None:
    """Normalisation over dims ``d..`` (layer / RMS norm): channels there mix in the statistics.

    Affine parameters are aligned to the trailing dims; each of their dims that matches ``x``'s is the same
    channels.
    """
    sx = static_shape(ctx, x)
    rank = len(sx)
    d = axis(d, rank)
    ctx.same_dims(x, out)
    for t in affine:
        st = static_shape(ctx, t)
        for i, s in enumerate(st):
            j = rank - len(st) + i
            if j >= d and s == sx[j]:
                ctx.unify_dims(t, i, x, j)
    ctx.mixes(ctx.dims(x)[d:])


def group_norm(ctx: RuleContext, x: Any, out: Any, groups: int, affine: Sequence[Any]) -> tuple[int, ...] | None:
    """GroupNorm over dim 1: C = groups x per_group; whole groups or per-group slots prune, the slots mix.

    Affine parameters cover C, or the groups. Returns the (groups, per group) atoms, or None when they do not
    divide (the channels are then frozen).
    """
    sx = static_shape(ctx, x)
    ctx.same_dims(x, out)
    if groups < 1 or sx[1] % groups:
        ctx.freeze([ctx.dims(x)[1]], "channels do not divide into the groups")
        return None
    parts = ctx.split(ctx.dims(x)[1], "prod", (groups, sx[1] // groups))
    for t in affine:
        size = static_shape(ctx, t)[0]
        if size == sx[1]:
            ctx.unify_dims(t, 0, x, 1)
        elif parts is not None and size == groups:
            ctx.unify(ctx.dims(t)[0], parts[0])
    if parts is not None:
        ctx.mixes([parts[1]])
    return parts


def reduce(ctx: RuleContext, x: Any, outs: Sequence[Any], dims: set[int]) -> None:
    """Reduction over ``dims``: they mix and vanish (or become size 1); the kept dims pass through."""
    rank = len(static_shape(ctx, x))
    ctx.mixes([ctx.dims(x)[d] for d in dims])
    keep = [i for i in range(rank) if i not in dims]
    for out in outs:
        so = ctx.shape(out)
        if so is None:
            continue
        if len(so) == rank:
            for i in keep:
                ctx.unify_dims(x, i, out, i)
        else:
            for j, i in enumerate(keep):
                ctx.unify_dims(x, i, out, j)


def leading(ctx: RuleContext, x: Any, outs: Sequence[Any], n: int) -> None:
    """The first ``n`` dims pass through (pooling: batch and channels); the rest are computed by the op."""
    for out in outs:
        for i in range(min(n, len(static_shape(ctx, x)))):
            ctx.unify_dims(x, i, out, i)


def same_sizes(ctx: RuleContext, x: Any, out: Any) -> None:
    """Dims that keep their size pass through; the others are computed by the op (padding, resampling)."""
    for i, (a, b) in enumerate(zip(static_shape(ctx, x), static_shape(ctx, out), strict=True)):
        if a == b:
            ctx.unify_dims(x, i, out, i)


# Shapes, layouts and indexing: the second half of the algebra, re-exported here (families.concat, ...).
from secateurs.ir.shape_families import (  # noqa: E402
    along_dims,
    broadcast_to,
    clamp_bound,
    concat,
    gather,
    index_block,
    permute,
    reshape,
    reshape_runs,
    slice_along,
    split,
    strided_slice,
    take_along,
    tile,
)
