"""The channel algebra of shape, layout and indexing op families, for both dialects.

Row-major reshapes, permutations, broadcasts to a bigger shape, tiling, concatenation and splitting, slices
(strided ones of interleaved layouts too), lookups and gathers by index, multi-tensor indexing and ops over
positions. Part of :mod:`secateurs.ir.families` (which re-exports every name): the same protocol, no framework
imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from secateurs.ir.families import axis, static_shape

if TYPE_CHECKING:
    from secateurs.ir.rules import RuleContext, Shape

__all__ = ["along_dims", "broadcast_to", "clamp_bound", "concat", "gather", "index_block", "permute", "reshape", "reshape_runs", "slice_along", "split", "strided_slice", "take_along", "tile"]


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
