"""ONNX channel rules for shape ops, indexing and quantisation.

Reshape / Flatten / Transpose / Expand / Tile, Concat / Split / Slice, Gather / GatherElements, the ops whose
indices are data, QuantizeLinear / DequantizeLinear.

They register into :data:`~secateurs.ir.onnx_rules.ONNX_RULES` (imported at the end of that module) and share
its helpers; these are the rules that record the literals a rewrite must change (Reshape / Expand targets,
Split sizes, Slice bounds).
"""

from __future__ import annotations

import onnx_ir as ir

from secateurs.ir import families
from secateurs.ir.onnx_context import OnnxRuleContext
from secateurs.ir.onnx_rules import _attr, _axis, _input, _literal_sizes, _numel, _shape, _tensors, onnx_rule

__all__: list[str] = []


# ------------------------------------------------------------------------------------------ shape ops
@onnx_rule("Reshape")
def _reshape(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Reshape to a known target: product refinement as for ATen ``view``; literal sizes in the target follow.

    ``-1`` and (without ``allowzero``) ``0`` are computed by the op; a size read from a tensor's shape stays
    equal to that size.
    """
    x, target, out = node.inputs[0], node.inputs[1], node.outputs[0]
    assert x is not None
    if ctx.ints(target) is None:
        ctx.freeze_value(x, "reshape target computed from data")
        ctx.freeze_value(out, "reshape target computed from data")
        return
    if not families.reshape(ctx, x, out):
        return
    allowzero = bool(_attr(node, "allowzero", 0))
    _literal_sizes(ctx, node, 1, out, list(range(len(_shape(ctx, out)))),
                   skip=lambda v: v == -1 or (v == 0 and not allowzero))


@onnx_rule("Flatten", "Squeeze", "Unsqueeze")
def _flatten(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Flatten / squeeze / unsqueeze: a reshape whose target follows from the input (nothing to rewrite)."""
    x = node.inputs[0]
    assert x is not None
    families.reshape(ctx, x, node.outputs[0])


@onnx_rule("Transpose")
def _transpose(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Permutation of dims: channels follow their dim."""
    x, out = node.inputs[0], node.outputs[0]
    rank = len(_shape(ctx, x))
    perm = _attr(node, "perm")
    families.permute(ctx, x, out, [int(p) for p in perm] if perm is not None else list(range(rank))[::-1])


@onnx_rule("Expand")
def _expand(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Broadcast to a bigger shape: existing non-1 dims pass through; broadcast dims hold copies.

    As in the ATen rule, a dim broadcast from size 1 stays free (Hugging Face's ``repeat_kv`` makes the query
    heads of a KV group this way) and is tagged ``copies``. Literal sizes in the shape input follow.
    """
    x, out = node.inputs[0], node.outputs[0]
    families.broadcast_to(ctx, x, out)
    so = _shape(ctx, out)
    vec = ctx.ints(_input(node, 1))
    if vec is None:
        ctx.freeze_value(out, "expand shape computed from data")
        return
    start = len(so) - len(vec)
    _literal_sizes(ctx, node, 1, out, [start + k for k in range(len(vec))], skip=lambda v: v == 1)


@onnx_rule("Tile")
def _tile(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Tile: each output dim is (repeats x input dim); the repeat factor is frozen."""
    families.tile(ctx, node.inputs[0], node.outputs[0])


@onnx_rule("Concat")
def _concat(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Concatenation: the output dim is the sum of the inputs' dims; other dims are shared."""
    families.concat(ctx, node.outputs[0], _tensors(ctx, node.inputs), int(_attr(node, "axis", 0)))


@onnx_rule("Split")
def _split(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Split: the input dim is the concatenation of the outputs' dims; the split sizes follow them."""
    x = node.inputs[0]
    sx = _shape(ctx, x)
    d = _axis(int(_attr(node, "axis", 0)), len(sx))
    outs = _tensors(ctx, node.outputs)
    split = _input(node, 1)
    if split is not None and ctx.ints(split) is None:
        ctx.freeze_value(x, "split sizes computed from data")
        for out in outs:
            ctx.freeze_value(out, "split sizes computed from data")
        return
    parts = families.split(ctx, x, outs, d, complete=len(outs) == len(node.outputs))
    if parts is None:
        return
    origins = ctx.origins(split) if split is not None else None
    if origins is not None and any(o is not None for o in origins):
        ctx.freeze([*parts, ctx.dims(x)[d]], "split sizes computed in the graph")
        ctx.freeze_sources(origins, "size read by split sizes")
        return
    ctx.shape_input(node, 1, parts)


@onnx_rule("Slice")
def _slice(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Slice with known bounds: a sliced dim is (before | kept | after); other dims pass through.

    Literal bounds along a dim whose channels may change are rewritten to the same positions among the kept
    channels; a strided slice, or bounds computed from sizes, freeze the dim.
    """
    x, out = node.inputs[0], node.outputs[0]
    sx = _shape(ctx, x)
    rank = len(sx)
    starts, ends = ctx.ints(_input(node, 1)), ctx.ints(_input(node, 2))
    axes_in, steps_in = _input(node, 3), _input(node, 4)
    axes = ctx.ints(axes_in) if axes_in is not None else (list(range(len(starts))) if starts is not None else None)
    steps = ctx.ints(steps_in) if steps_in is not None else ([1] * len(axes) if axes is not None else None)
    if starts is None or ends is None or axes is None or steps is None:
        ctx.freeze_value(x, "slice bounds computed from data")
        ctx.freeze_value(out, "slice bounds computed from data")
        return
    start_origin = ctx.origins(_input(node, 1)) or (None,) * len(starts)
    end_origin = ctx.origins(_input(node, 2)) or (None,) * len(ends)
    sliced = {}
    for k, axis in enumerate(axes):
        sliced[_axis(axis, rank)] = k
    for i in range(rank):
        if i not in sliced:
            ctx.unify_dims(x, i, out, i)
    for i, k in sliced.items():
        n, raw_start, raw_end = sx[i], starts[k], ends[k]
        start, end = families.clamp_bound(raw_start, n), families.clamp_bound(raw_end, n)
        start_follows = start == 0 or start_origin[k] is None
        end_follows = (end == n and raw_end >= n) or end_origin[k] is None
        done = families.slice_along(ctx, x, out, i, start, end, steps[k],
                                    fixed_bounds=not (start_follows and end_follows))
        if done == "fixed":
            ctx.freeze_sources([start_origin[k], end_origin[k]], "size read by slice bounds")
        elif done == "part":
            if start > 0:
                ctx.slice_bound(node, 1, k, ctx.dims(x)[i], raw_start)
            if end < n:
                ctx.slice_bound(node, 2, k, ctx.dims(x)[i], raw_end)


@onnx_rule("Gather")
def _gather(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Gather (embedding lookup, select): the indexed dim is frozen; other data dims pass through.

    Output dims are data[:axis] + indices dims + data[axis + 1:].
    """
    families.gather(ctx, node.inputs[0], node.outputs[:1], int(_attr(node, "axis", 0)), node.inputs[1],
                    "indexed by tensor indices")


@onnx_rule("GatherElements")
def _gather_elements(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Element-wise gather along an axis: that axis is frozen; the output has the indices' dims."""
    families.take_along(ctx, node.inputs[0], node.outputs[0], int(_attr(node, "axis", 0)), node.inputs[1])


@onnx_rule("GatherND")
def _gather_nd(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """``GatherND(data, indices, batch_dims=b)``: ATen's multi-tensor indexing (``x[i, j]``) in ONNX.

    ``data[b : b + k]`` is indexed (``k = indices.shape[-1]``); the ``b`` batch dims lead and the dims after
    the block trail the output, as :func:`~secateurs.ir.families.index_block` says.
    """
    data, indices, out = node.inputs[0], node.inputs[1], node.outputs[0]
    b = int(_attr(node, "batch_dims", 0))
    k = _shape(ctx, indices)[-1]
    families.index_block(ctx, data, out, list(range(b, b + k)), [indices])


@onnx_rule("ScatterND", "ScatterElements", "NonZero", "Compress", "Unique", "OneHot",
           "Range", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
           "RandomUniformLike", "Multinomial", "Bernoulli", "Shape", "Size", "Constant")
def _opaque(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Data-dependent indexing and tensor factories: every dim they touch is frozen."""
    why = "shape is a literal of a tensor factory" if not _tensors(ctx, node.inputs) else "data-dependent indexing"
    for v in _tensors(ctx, [*node.inputs, *node.outputs]):
        if node.op_type in ("Shape", "Size") and v in node.inputs:
            continue  # reading a size does not touch the channels; the consumers of the size decide
        ctx.freeze_value(v, why)


@onnx_rule("QuantizeLinear", "DequantizeLinear")
def _quantize(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """(De)quantisation: elementwise, with per-axis scale and zero point along ``axis``."""
    x, out = node.inputs[0], node.outputs[0]
    sx = _shape(ctx, x)
    ctx.same_dims(x, out)
    axis = _axis(int(_attr(node, "axis", 1)), len(sx)) if sx else 0
    for t in node.inputs[1:3]:
        if t is None or not ctx.is_tensor(t):
            continue
        st = _shape(ctx, t)
        if len(st) == 1 and st[0] == sx[axis]:
            ctx.unify_dims(t, 0, x, axis)
        elif len(st) > 0 and _numel(st) > 1:
            ctx.freeze_value(x, "blocked quantisation")
    if node.op_type == "DequantizeLinear" and x is not None and ctx.graph.is_weight(x):
        ctx.params.add(x.name or "")
