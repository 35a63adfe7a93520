# FX node arguments are dynamically typed (``Argument`` is a wide union); rules read them by schema position.
# mypy: disable-error-code="union-attr,arg-type,index,operator,misc"
"""Channel rules for ATen shape ops (views, permutes, concatenation, splits, slices, indexing) and tensor factories.

The computing ops are in :mod:`secateurs.ir.aten_rules`, which imports this module so both register together.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from secateurs.ir import families
from secateurs.ir.aten_args import arg as _arg
from secateurs.ir.rules import SYNCED_SIZES, RuleContext, op_rule

__all__: list[str] = []

aten = torch.ops.aten
_dim = families.axis


# ------------------------------------------------------------------------------------------- shape ops
@op_rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
         aten.unsqueeze.default, aten.view_as.default, aten.reshape_as.default, aten.squeeze_.dim,
         aten.unsqueeze_.default)
def _reshape(ctx: RuleContext, node: fx.Node) -> None:
    """Row-major reshape: runs of dims with equal products are one channel space, split as a product."""
    families.reshape(ctx, node.args[0], node)


@op_rule(aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.swapaxes.default,
         aten.movedim.int)
def _permute(ctx: RuleContext, node: fx.Node) -> None:
    """Permutation of dims: channels follow their dim."""
    x = node.args[0]
    sx = ctx.shape(x)
    assert sx is not None
    rank = len(sx)
    order = list(range(rank))
    if node.target is aten.permute.default:
        order = [_dim(int(d), rank) for d in node.args[1]]
    elif node.target in (aten.transpose.int, aten.swapaxes.default):
        d0, d1 = _dim(int(node.args[1]), rank), _dim(int(node.args[2]), rank)
        order[d0], order[d1] = order[d1], order[d0]
    elif node.target in (aten.t.default, aten.numpy_T.default):
        order = order[::-1]
    elif node.target is aten.movedim.int:
        src, dst = _dim(int(node.args[1]), rank), _dim(int(node.args[2]), rank)
        order.pop(src)
        order.insert(dst, src)
    families.permute(ctx, x, node, order)


@op_rule(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
def _expand(ctx: RuleContext, node: fx.Node) -> None:
    """Broadcast to a bigger shape (:func:`secateurs.ir.families.broadcast_to`)."""
    families.broadcast_to(ctx, node.args[0], node)


@op_rule(aten.repeat.default)
def _repeat(ctx: RuleContext, node: fx.Node) -> None:
    """Tile: each output dim is (repeats x input dim); the repeat factor is frozen."""
    families.tile(ctx, node.args[0], node)


@op_rule(aten.cat.default, aten.concat.default, aten.concatenate.default)
def _cat(ctx: RuleContext, node: fx.Node) -> None:
    """Concatenation: the output dim is the sum of the inputs' dims; other dims are shared."""
    families.concat(ctx, node, [t for t in node.args[0] if ctx.is_tensor(t)], int(_arg(node, "dim", 0)))


@op_rule(aten.stack.default)
def _stack(ctx: RuleContext, node: fx.Node) -> None:
    """Stack along a new dim: that dim is a literal count (frozen); the others are shared."""
    tensors = list(node.args[0])
    so = ctx.shape(node)
    assert so is not None
    d = _dim(int(_arg(node, "dim", 0)), len(so))
    for t in tensors:
        for i in range(len(so)):
            if i < d:
                ctx.unify_dims(t, i, node, i)
            elif i > d:
                ctx.unify_dims(t, i - 1, node, i)
    ctx.freeze([ctx.dims(node)[d]], "stacked count")


def _split_outputs(ctx: RuleContext, node: fx.Node, dim: int) -> None:
    families.split(ctx, node.args[0], [(node, i) for i in range(len(node.meta["val"]))], dim)


@op_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
         aten.tensor_split.indices,
         aten.split.sizes)
def _split(ctx: RuleContext, node: fx.Node) -> None:
    """Split / chunk: the input dim is the concatenation of the outputs' dims."""
    _split_outputs(ctx, node, int(_arg(node, "dim", 0)))


@op_rule(aten.unbind.int)
def _unbind(ctx: RuleContext, node: fx.Node) -> None:
    """Unbind: one output per index of a dim; that dim is indexed (frozen), the others pass through."""
    outs = [(node, k) for k in range(len(node.meta["val"]))]
    families.gather(ctx, node.args[0], outs, int(_arg(node, "dim", 0)), None, "unbind index")


@op_rule(aten.select.int)
def _select(ctx: RuleContext, node: fx.Node) -> None:
    """Select one index: that dim is indexed (frozen); the others pass through."""
    families.gather(ctx, node.args[0], [node], int(node.args[1]), None, "indexed by select")


@op_rule(aten.slice.Tensor, aten.narrow.default)
def _slice(ctx: RuleContext, node: fx.Node) -> None:
    """Contiguous slice: the input dim is (before | kept | after); a full slice passes through."""
    x = node.args[0]
    sx, so = ctx.shape(x), ctx.shape(node)
    assert sx is not None and so is not None
    d = _dim(int(node.args[1]) if len(node.args) > 1 else int(_arg(node, "dim", 0)), len(sx))
    for i in range(len(sx)):
        if i != d:
            ctx.unify_dims(x, i, node, i)
    n = sx[d]
    if node.target is aten.narrow.default:
        start, step = int(node.args[2]), 1
        end = start + int(node.args[3])
    else:
        start, end = _arg(node, "start", None), _arg(node, "end", None)
        step = int(_arg(node, "step", 1) or 1)
        start = families.clamp_bound(0 if start is None else int(start), n)
        end = families.clamp_bound(n if end is None else int(end), n)
    families.slice_along(ctx, x, node, d, start, end, step)


@op_rule(aten.index_select.default, aten.gather.default)
def _index_select(ctx: RuleContext, node: fx.Node) -> None:
    """Data-dependent indexing along one dim: that dim is frozen, the others pass through."""
    index = node.args[2] if node.target is aten.gather.default else None
    families.take_along(ctx, node.args[0], node, int(node.args[1]), index)


@op_rule(aten.index.Tensor)
def _index(ctx: RuleContext, node: fx.Node) -> None:
    """Advanced indexing: indexed dims are frozen; unindexed dims before and after the block pass through.

    With one contiguous block of index tensors the result is ``x[:first] + index shape + x[last+1:]``.
    """
    indices = list(node.args[1])
    used = [i for i, ix in enumerate(indices) if ix is not None]
    families.index_block(ctx, node.args[0], node, used, [indices[i] for i in used])


# --------------------------------------------------------------------------------------- factories, misc
@op_rule(aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
         aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.rand.default,
         aten.randn.default, aten.tensor.default, aten.eye.default, aten.new_zeros.default,
         aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
         aten.lift_fresh.default)
def _factory(ctx: RuleContext, node: fx.Node) -> None:
    """Tensors created with a literal shape: every dim is frozen.

    Except a dim whose size is one the running module keeps in an attribute the rewrite re-syncs
    (:data:`~secateurs.ir.rules.SYNCED_SIZES`: Mamba allocates its scan state at ``self.intermediate_size``).
    """
    shape = ctx.shape(node)
    module = ctx.module_of(node)
    synced = {getattr(module, a) for a in SYNCED_SIZES if isinstance(getattr(module, a, None), int)}
    if shape is None or not synced or node.target not in _SIZED_FACTORIES:
        ctx.freeze_value(node, "shape is a literal of a tensor factory")
        return
    dims = list(zip(ctx.dims(node), shape, strict=True))
    ctx.freeze([a for a, size in dims if size not in synced], "shape is a literal of a tensor factory")
    ctx.mark(*[a for a, size in dims if size in synced])


_SIZED_FACTORIES = (aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
                    aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default)


@op_rule(aten._assert_tensor_metadata.default, aten.sym_size.int, aten._assert_scalar.default,
         aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default)
def _no_channels(ctx: RuleContext, node: fx.Node) -> None:
    """Checks and size queries carry no channels; a metadata assertion with a size freezes its input."""
    if node.target is aten._assert_tensor_metadata.default and _arg(node, "size") is not None:
        ctx.freeze_value(node.args[0], "size asserted in the graph")
    if node.target is aten.sym_size.int and isinstance(node.args[0], fx.Node):
        ctx.freeze_value(node.args[0], "size read by the graph")


@op_rule(operator.getitem)
def _getitem(ctx: RuleContext, node: fx.Node) -> None:
    """Element of a multi-output op: the same atoms as that output."""
    src, index = node.args[0], node.args[1]
    if isinstance(src, fx.Node) and isinstance(index, int) and ctx.is_tensor(node):
        ctx.alias(node, (src, index))
        ctx.mark(*ctx.dims(node))

