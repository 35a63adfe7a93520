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

from collections.abc import Iterable, Sequence
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


def reshape_runs(src: Shape, dst: Shape) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source and destination dims with equal products (size-1 dims ignored), or None."""
    si = [i for i, s in enumerate(src) if s != 1]
    di = [i for i, s in enumerate(dst) if s != 1]
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(si) and j < len(di):
        a, b = [si[i]], [di[j]]
        pa, pb = src[si[i]], dst[di[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(si):
                    return None
                a.append(si[i])
                pa *= src[si[i]]
                i += 1
            else:
                if j >= len(di):
                    return None
                b.append(di[j])
                pb *= dst[di[j]]
                j += 1
        runs.append((a, b))
    if i != len(si) or j != len(di):
        return None
    return runs


def reshape(ctx: RuleContext, x: Any, out: Any) -> bool:
    """Row-major reshape: runs of dims with equal products are one channel space, refined as a product.

    Returns False (both sides frozen) when the reshape cannot be factored into such runs.
    """
    sx, so = static_shape(ctx, x), static_shape(ctx, out)
    runs = reshape_runs(sx, so)
    if runs is None:
        ctx.freeze_value(x, "reshape that cannot be factored")
        ctx.freeze_value(out, "reshape that cannot be factored")
        return False
    xd, od = ctx.dims(x), ctx.dims(out)
    for a, b in runs:
        ctx.unify(ctx.product([xd[i] for i in a]), ctx.product([od[j] for j in b]))
        ctx.mark(*(xd[i] for i in a), *(od[j] for j in b))
    ctx.mark(*(od[j] for j, s in enumerate(so) if s == 1))
    return True


def permute(ctx: RuleContext, x: Any, out: Any, order: Sequence[int]) -> None:
    """Permutation of dims: output dim ``j`` is input dim ``order[j]``; channels follow their dim."""
    for j, i in enumerate(order):
        ctx.unify_dims(x, i, out, j)


def broadcast_to(ctx: RuleContext, x: Any, out: Any) -> None:
    """Broadcast to a bigger shape: existing non-1 dims pass through; broadcast dims hold copies.

    A dim broadcast from size 1 holds identical copies, so any subset of them is as valid as all; it stays free
    and is tagged ``copies`` (Hugging Face's ``repeat_kv`` makes the query heads of a KV group this way).
    Whether the model's code then expands to the smaller count is checked when the rewrite is verified.
    """
    ctx.broadcast(out, [x])
    ctx.mark(*ctx.dims(out))
    sx, so = static_shape(ctx, x), static_shape(ctx, out)
    offset = len(so) - len(sx)
    ctx.tag([a for j, a in enumerate(ctx.dims(out)) if so[j] > 1 and (j < offset or sx[j - offset] == 1)], "copies")


def tile(ctx: RuleContext, x: Any, out: Any) -> None:
    """Tile: each output dim is (repeats x input dim); the repeat factor is frozen (new leading dims too)."""
    sx, so = static_shape(ctx, x), static_shape(ctx, out)
    offset = len(so) - len(sx)
    for j in range(len(so)):
        i = j - offset
        if i < 0:
            continue
        reps = so[j] // sx[i] if sx[i] else 1
        if reps == 1:
            ctx.unify_dims(x, i, out, j)
        else:
            r = ctx.new(reps)
            ctx.freeze([r], "repeat factor")
            ctx.unify(ctx.dims(out)[j], ctx.product([r, ctx.dims(x)[i]]))


def concat(ctx: RuleContext, out: Any, tensors: Sequence[Any], d: int) -> None:
    """Concatenation along ``d``: the output dim is the sum of the inputs' dims; the other dims are shared.

    Inputs of another rank (legacy empty tensors) take no part.
    """
    so = static_shape(ctx, out)
    d = axis(d, len(so))
    parts = []
    for t in tensors:
        st = static_shape(ctx, t)
        if len(st) != len(so):
            continue
        for i in range(len(so)):
            if i != d:
                ctx.unify_dims(t, i, out, i)
        parts.append(ctx.dims(t)[d])
    ctx.unify(ctx.dims(out)[d], ctx.concat(parts))


def split(ctx: RuleContext, x: Any, outs: Sequence[Any], d: int, *, complete: bool = True) -> list[int] | None:
    """Split along ``d``: the input dim is the concatenation of the outputs' dims; the other dims are shared.

    ``complete=False`` says some outputs are not tensors this analysis sees. Returns the outputs' atoms along
    ``d``, or None (all frozen) when the outputs do not cover the input.
    """
    sx = static_shape(ctx, x)
    d = axis(d, len(sx))
    sizes = []
    for out in outs:
        for i in range(len(sx)):
            if i != d:
                ctx.unify_dims(x, i, out, i)
        sizes.append(static_shape(ctx, out)[d])
    parts = [ctx.dims(out)[d] for out in outs]
    if sum(sizes) != sx[d] or not complete:
        ctx.freeze([*parts, ctx.dims(x)[d]], "split does not cover its input")
        return None
    ctx.unify(ctx.dims(x)[d], ctx.concat(parts))
    return parts


def along_dims(ctx: RuleContext, x: Any, outs: Sequence[Any], dims: Iterable[int], reason: str) -> None:
    """Reordering, selecting or accumulating positions along ``dims`` (roll, flip, cumsum, sort, top-k, triangles).

    Those dims of ``x`` and of every output are frozen with ``reason``; the other dims pass through position by
    position.
    """
    rank = len(static_shape(ctx, x))
    mixed = {axis(int(d), rank) for d in dims}
    for out in outs:
        for i in range(rank):
            if i not in mixed:
                ctx.unify_dims(x, i, out, i)
    ctx.freeze([ctx.dims(v)[d] for v in (x, *outs) for d in sorted(mixed)], reason)


def gather(ctx: RuleContext, data: Any, outs: Sequence[Any], d: int, index: Any | None, reason: str) -> None:
    """Positions picked along ``d`` by index values (embedding lookup, ONNX's Gather, select, unbind).

    ``data[d]`` is frozen with ``reason``: the indices name its positions. Each output is
    ``data[:d] + index dims + data[d + 1:]``: those dims pass through (``index=None``: one scalar index, so
    ``d`` disappears, as in ``select`` and each output of ``unbind``).
    """
    sd = static_shape(ctx, data)
    d = axis(d, len(sd))
    ctx.freeze([ctx.dims(data)[d]], reason)
    n = len(static_shape(ctx, index)) if index is not None else 0
    for out in outs:
        for i in range(d):
            ctx.unify_dims(data, i, out, i)
        for j in range(n):
            ctx.unify_dims(index, j, out, d + j)
        for i in range(d + 1, len(sd)):
            ctx.unify_dims(data, i, out, i - 1 + n)


def index_block(ctx: RuleContext, x: Any, out: Any, indexed: Sequence[int], indices: Sequence[Any]) -> None:
    """Advanced indexing by several index tensors at once (``x[i, j]``, ONNX ``GatherND``).

    The indexed dims of ``x`` and the index tensors are frozen; dims before the first indexed one pass
    through at the same positions, and with one contiguous block of indexed dims the dims after it pass
    through to the output's last dims (its middle dims come from the index tensors' shapes).
    """
    sx, so = static_shape(ctx, x), static_shape(ctx, out)
    for i in indexed:
        ctx.freeze([ctx.dims(x)[i]], "indexed by tensor indices")
    for index in indices:
        ctx.freeze_value(index, "index tensor")
    if not indexed:
        ctx.same_dims(x, out)
        return
    first, last = indexed[0], indexed[-1]
    for i in range(first):
        ctx.unify_dims(x, i, out, i)
    if list(indexed) == list(range(first, last + 1)):
        trailing = len(sx) - last - 1
        for k in range(trailing):
            ctx.unify_dims(x, len(sx) - trailing + k, out, len(so) - trailing + k)


def take_along(ctx: RuleContext, data: Any, out: Any, d: int, index: Any | None = None,
               reason: str = "indexed by tensor indices") -> None:
    """Positions picked along ``d`` with the rank kept (``index_select``, ``gather``, ONNX's GatherElements).

    ``d`` is frozen in ``data`` and ``out``; the other dims pass through where their sizes agree. ``index``
    given: it has the output's shape (element-wise gather), so it shares its dims.
    """
    sd, so = static_shape(ctx, data), static_shape(ctx, out)
    d = axis(d, len(sd))
    ctx.freeze([ctx.dims(data)[d], ctx.dims(out)[d]], reason)
    for i in range(len(sd)):
        if i != d and sd[i] == so[i]:
            ctx.unify_dims(data, i, out, i)
    if index is not None:
        ctx.same_dims(index, out)


def slice_along(ctx: RuleContext, x: Any, out: Any, d: int, start: int, end: int, step: int, *,
                fixed_bounds: bool = False) -> str:
    """One sliced dim ``x[start:end:step]`` along ``d`` (bounds already clamped to ``[0, size]``).

    A whole-dim slice passes through; a contiguous part splits the dim as ``before | kept | after`` and the
    kept run is the output's channels (the channels outside stay free: bounds the model computes from the size
    follow, literal ones are caught by the verification); strided slices go to :func:`strided_slice`.
    ``fixed_bounds``: the bounds are sizes the graph computes and a rewrite cannot move, so a strict part is
    frozen. Returns what happened: ``"whole"``, ``"part"`` (the caller's bounds are positions along ``x[d]``),
    ``"strided"``, ``"empty"``, ``"fixed"`` or ``"frozen"``.
    """
    n = static_shape(ctx, x)[d]
    xa, oa = ctx.dims(x)[d], ctx.dims(out)[d]
    if step != 1:
        if not strided_slice(ctx, x, out, d, start, end, step):
            ctx.freeze([xa, oa], "strided slice")
        return "strided"
    length = max(0, end - start)
    if start == 0 and length == n:
        ctx.unify(xa, oa)
        return "whole"
    if length == 0:  # an empty slice (the pass-through part of a rotary embedding over the whole head)
        ctx.freeze([oa], "empty slice", channel=False)
        return "empty"
    if fixed_bounds:
        ctx.freeze([xa, oa], "slice bounds computed in the graph")
        return "fixed"
    parts = ctx.split(xa, "sum", [s for s in (start, length, n - start - length) if s > 0])
    if parts is None:
        ctx.freeze([oa], "slice of frozen channels")
        return "frozen"
    ctx.unify(parts[1] if start > 0 else parts[0], oa)
    return "part"


def clamp_bound(raw: int, n: int) -> int:
    """A slice bound (negative: from the end) clamped to ``[0, n]``, as Python and ONNX slicing do."""
    return min(max(raw + n if raw < 0 else raw, 0), n)


def strided_slice(ctx: RuleContext, x: Any, out: Any, d: int, start: int, end: int, step: int) -> bool:
    """``x[start::step]`` along ``d`` over the whole dim: one position of every run of ``step`` (interleaved layouts).

    The dim is ``runs x step`` row-major; the output's channels are the runs, so ``x[0::2]`` and ``x[1::2]`` of an
    interleaved gate / up projection couple each gate with its up neuron. Returns False (nothing linked) for any
    other strided slice.
    """
    n = static_shape(ctx, x)[d]
    if step <= 1 or n % step or not 0 <= start < step or end < n - (step - 1):
        return False
    parts = ctx.split(ctx.dims(x)[d], "prod", (n // step, step))
    if parts is None:
        return False
    ctx.unify(parts[0], ctx.dims(out)[d])
    ctx.freeze([parts[1]], "position within an interleaved run (a strided slice picks it)")
    return True


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
