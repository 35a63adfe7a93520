"""Channel rules for ONNX ops (default domain, opset >= 13), over onnx-ir nodes and values.

The rules speak the same language as the ATen rules (:mod:`secateurs.ir.aten_rules`): a rule unifies the
dimension atoms of its inputs and outputs, refines them into products (heads x head_dim, groups x
per_group) or concatenations, and freezes what cannot change. What differs is the op table and the context:
:class:`OnnxRuleContext` keys atoms by onnx-ir values and reads static shapes and evaluated shape tensors
from an :class:`~secateurs.ir.onnx_graph.OnnxGraph`. Because an ONNX graph holds sizes as literals (a
``Reshape`` target, an ``Expand`` shape, ``Slice`` bounds, a ``Conv`` ``group``), a rule also records which
literal follows which atom, so the rewrite can change exactly those.

Ops absent from this table freeze every dimension they touch and are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import onnx_ir as ir

from secateurs.errors import UnsupportedOpError
from secateurs.ir import cost, families
from secateurs.ir.onnx_context import (
    SIZE_INPUTS,
    AttrSize,
    OnnxFlopFn,
    OnnxOpRule,
    OnnxOpRuleTable,
    OnnxRuleContext,
    OnnxRuleFn,
    OnnxShapeOf,
    ShapeInput,
    SliceBound,
)
from secateurs.ir.onnx_graph import Computed
from secateurs.ir.rules import Shape

__all__ = [
    "ONNX_RULES",
    "SIZE_INPUTS",
    "AttrSize",
    "OnnxFlopFn",
    "OnnxOpRule",
    "OnnxOpRuleTable",
    "OnnxRuleContext",
    "OnnxRuleFn",
    "ShapeInput",
    "SliceBound",
    "onnx_rule",
]


ONNX_RULES = OnnxOpRuleTable()


def onnx_rule(*ops: str, domain: str = "", flops: OnnxFlopFn | None = None) -> Callable[[OnnxRuleFn], OnnxRuleFn]:
    """Decorator registering a rule function for ONNX op types ``ops`` in :data:`ONNX_RULES`."""

    def deco(fn: OnnxRuleFn) -> OnnxRuleFn:
        ONNX_RULES.register(ops, fn, domain=domain, flops=flops)
        return fn

    return deco


# --------------------------------------------------------------------------------------------- helpers
def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


_axis = families.axis


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _tensors(ctx: OnnxRuleContext, values: Iterable[ir.Value | None]) -> list[ir.Value]:
    return [v for v in values if v is not None and ctx.is_tensor(v)]


def _shape(ctx: OnnxRuleContext, value: ir.Value | None) -> Shape:
    shape = ctx.shape(value)
    if shape is None:
        raise UnsupportedOpError(f"{ctx.where()}: value {value.name if value else None!r} has no static shape")
    return shape


_numel = cost.numel


# ---------------------------------------------------------------------------------------- elementwise
_ELEMENTWISE = [
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    "BitwiseNot", "BitShift", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Erf", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Shrink", "Exp", "Log",
    "Sqrt", "Reciprocal", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Tan", "Asin", "Acos",
    "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "IsNaN", "IsInf", "Clip", "Cast", "Identity", "Dropout",
    "Softmax", "LogSoftmax", "Hardmax",
]
_NORMALISING = ("Softmax", "LogSoftmax", "Hardmax")


@onnx_rule(*_ELEMENTWISE)
def _elementwise(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Broadcasting op: every non-broadcast input dim is the same channels as the output dim.

    Softmax normalises along ``axis``; its channels mix there but keep their identity.
    """
    normalises = (node.inputs[0], int(_attr(node, "axis", -1))) if node.op_type in _NORMALISING else None
    families.elementwise(ctx, _tensors(ctx, node.outputs), _tensors(ctx, node.inputs), normalises=normalises)


@onnx_rule("CastLike")
def _cast_like(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Cast to another tensor's type: only the first input's dims flow (the second gives the type)."""
    ctx.same_dims(node.inputs[0], node.outputs[0])


@onnx_rule("FastGelu", "BiasGelu", "QuickGelu", "Gelu", "BiasAdd", domain="com.microsoft")
def _ms_elementwise(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """ONNX Runtime's fused activations: broadcasting over their inputs (a bias over the last dim)."""
    families.elementwise(ctx, _tensors(ctx, node.outputs), _tensors(ctx, node.inputs))


@onnx_rule("Trilu")
def _trilu(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Upper / lower triangle: positions along the last two dims matter, so they are frozen."""
    families.along_dims(ctx, node.inputs[0], node.outputs[:1], [-2, -1], "position-dependent op")


@onnx_rule("CumSum")
def _cumsum(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Cumulative sum along one axis: that axis is frozen, the others pass through."""
    x = node.inputs[0]
    axes = ctx.ints(_input(node, 1))
    dims = axes if axes is not None else range(len(_shape(ctx, x)))
    families.along_dims(ctx, x, node.outputs[:1], dims, "position-dependent op")


@onnx_rule("TopK")
def _topk(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Top-k values and indices along ``axis``: that axis is frozen, the others pass through."""
    outs = [v for v in node.outputs if v is not None]
    families.along_dims(ctx, node.inputs[0], outs, [_attr(node, "axis", -1)], "sorted or selected along this dim")


# ------------------------------------------------------------------------------------ linear algebra
def _matmul_flops(node: ir.Node, shape_of: OnnxShapeOf) -> float:
    a = shape_of(node.inputs[0])
    return cost.matmul_flops(shape_of(node.outputs[0]), a[-1] if a else 0)


@onnx_rule("MatMul", flops=_matmul_flops)
def _matmul(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Batched matrix product: a[..., k] ~ b[..., k, :]; rows of a and columns of b pass through.

    A product of two activations is attention (:func:`~secateurs.ir.families.attention_product`).
    """
    a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
    assert a is not None and b is not None
    families.matmul(ctx, a, b, out)
    if families.attention_product(ctx, a, b, out):
        return
    for value, shape in ((a, _shape(ctx, a)), (b, _shape(ctx, b))):
        if not ctx.is_activation(value) and len(shape) >= 2:
            ctx.linear_weight(value)


def _gemm_flops(node: ir.Node, shape_of: OnnxShapeOf) -> float:
    a = shape_of(node.inputs[0])
    k = (a[0] if _attr(node, "transA", 0) else a[1]) if a else 0
    return cost.matmul_flops(shape_of(node.outputs[0]), k)


@onnx_rule("Gemm", flops=_gemm_flops)
def _gemm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Y = alpha op(A) op(B) + beta C: the contracted dims of A and B are shared; C broadcasts to Y."""
    a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
    c = _input(node, 2)
    families.linear(ctx, a, b, out, c if c is not None and ctx.is_tensor(c) else None,
                    x_in=0 if _attr(node, "transA", 0) else 1, w_in=1 if _attr(node, "transB", 0) else 0)
    for value in (a, b):
        if not ctx.is_activation(value):
            ctx.linear_weight(value)


def _attention_flops(node: ir.Node, shape_of: OnnxShapeOf) -> float:
    q, k, v = (shape_of(_input(node, i)) for i in range(3))
    return cost.attention_flops(q, k, v)


@onnx_rule("Attention", flops=_attention_flops)
def _attention(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Fused attention (opset 23) on ``[batch, heads, seq, head_dim]`` q, k, v, GQA included.

    The family ATen's ``scaled_dot_product_attention`` uses (:func:`~secateurs.ir.families.attention`).

    The 3-D form (heads folded into the hidden size by ``q_num_heads`` / ``kv_num_heads``), a KV cache
    (``past_key`` / ``present_key``) and the ``qk_matmul_output`` output are not decoded: the node's channels
    freeze and it is reported.
    """
    q, k, v = (_input(node, i) for i in range(3))
    mask = _input(node, 3)
    extra = [i for i in range(4, len(node.inputs)) if node.inputs[i] is not None]
    extra += [i for i, o in enumerate(node.outputs) if i > 0 and o is not None and o.uses()]
    if len(_shape(ctx, q)) != 4 or extra:
        raise UnsupportedOpError(f"{ctx.where()}: Attention in its 3-D form, with a KV cache or with its scores "
                                 "output (the rule reads 4-D q, k, v and one output)")
    families.attention(ctx, q, k, v, node.outputs[0], mask if mask is not None and ctx.is_tensor(mask) else None)


# -------------------------------------------------------------------------------------------- conv
def _conv_flops(node: ir.Node, shape_of: OnnxShapeOf) -> float:
    w, out = shape_of(node.inputs[1]), shape_of(node.outputs[0])
    if not w or not out:
        return 0.0
    if node.op_type == "ConvTranspose":
        return cost.conv_transpose_flops(shape_of(node.inputs[0]), w)
    return cost.conv_flops(out, w)


@onnx_rule("Conv", "ConvTranspose", flops=_conv_flops)
def _conv(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Convolution with groups: channels are ``group x per_group`` on both sides.

    Conv: input C = G x Ci ~ weight dim 1 (Ci); weight dim 0 = G x Co ~ output C ~ bias. ConvTranspose:
    weight is [C_in, C_out / G, ...]. The ``group`` attribute follows the G atom; kernel and spatial dims are
    frozen.
    """
    x, w, out = node.inputs[0], node.inputs[1], node.outputs[0]
    b = _input(node, 2)
    groups = int(_attr(node, "group", 1))
    g = families.conv(ctx, x, w, out, b if b is not None and ctx.is_tensor(b) else None, groups=groups,
                      transposed=node.op_type == "ConvTranspose")
    if groups > 1:
        ctx.attr_size(node, "group", g)


# ------------------------------------------------------------------------------------------- norms
@onnx_rule("BatchNormalization", "InstanceNormalization")
def _batch_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Per-channel normalisation over dim 1: scale, bias and running statistics follow the channels.

    InstanceNormalization's statistics run over every dim after the channels; an exported GroupNorm
    (``Reshape`` to [N, groups, -1] first) puts the channels of a group there, so those mix.
    """
    x = node.inputs[0]
    params = _tensors(ctx, node.inputs[1:])
    for t in params[2:]:
        if node.op_type == "BatchNormalization" and ctx.graph.is_weight(t):
            ctx.buffers.add(t.name or "")
    families.per_channel_norm(ctx, x, node.outputs[0], params, _tensors(ctx, node.outputs[1:]),
                              instance=node.op_type == "InstanceNormalization")


def _norm_over(ctx: OnnxRuleContext, node: ir.Node, x: ir.Value | None, affine: Sequence[ir.Value | None],
               axis: int) -> None:
    assert x is not None
    families.normalise_over(ctx, x, node.outputs[0], _tensors(ctx, affine), axis)


@onnx_rule("LayerNormalization")
def _layer_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Normalisation over dims ``axis..`` (channels mix in the statistics); Mean / InvStdDev are frozen."""
    x = node.inputs[0]
    _norm_over(ctx, node, x, [_input(node, 1), _input(node, 2)], int(_attr(node, "axis", -1)))
    for out in node.outputs[1:]:
        ctx.freeze_value(out, "normalisation statistics output")


@onnx_rule("SimplifiedLayerNormalization", "RMSNormalization")
@onnx_rule("SimplifiedLayerNormalization", domain="com.microsoft")
def _rms_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """RMS normalisation over dims ``axis..`` with a scale (no bias)."""
    x = node.inputs[0]
    _norm_over(ctx, node, x, [_input(node, 1)], int(_attr(node, "axis", -1)))
    for out in node.outputs[1:]:
        ctx.freeze_value(out, "normalisation statistics output")


@onnx_rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft")
def _skip_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """ONNX Runtime's residual add + (RMS) LayerNorm over the last dim; the sum output keeps the channels."""
    x, skip = node.inputs[0], node.inputs[1]
    ctx.broadcast(node.outputs[0], _tensors(ctx, [x, skip]))
    _norm_over(ctx, node, x, list(node.inputs[2:]), -1)
    for i, out in enumerate(node.outputs[1:], start=1):
        if not ctx.is_tensor(out):
            continue
        if i == len(node.outputs) - 1 and i >= 3:
            ctx.same_dims(x, out)
        else:
            ctx.freeze_value(out, "normalisation statistics output")


@onnx_rule("GroupNormalization")
def _group_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """GroupNorm: C = num_groups x per_group; scale covers C (opset 21) or the groups (opset 18)."""
    parts = families.group_norm(ctx, node.inputs[0], node.outputs[0], int(_attr(node, "num_groups", 1)),
                                _tensors(ctx, node.inputs[1:3]))
    if parts is not None:
        ctx.attr_size(node, "num_groups", parts[0])


# --------------------------------------------------------------------------------------- reductions
_REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


@onnx_rule(*_REDUCE, "ArgMax", "ArgMin")
def _reduce(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Reduction over some axes (attribute or input): kept dims pass through, reduced ones mix and vanish."""
    x, out = node.inputs[0], node.outputs[0]
    rank = len(_shape(ctx, x))
    if node.op_type in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [int(_attr(node, "axis", 0))]
    elif "axes" in node.attributes:
        axes = [int(a) for a in _attr(node, "axes")]
    elif _input(node, 1) is not None:
        axes = ctx.ints(_input(node, 1))
        if axes is None:
            ctx.freeze_value(x, "reduction axes computed from data")
            ctx.freeze_value(out, "reduction axes computed from data")
            return
    else:
        axes = []
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            ctx.same_dims(x, out)
            return
        axes = list(range(rank))
    families.reduce(ctx, x, [out], {_axis(a, rank) for a in axes})


@onnx_rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxPool", "AveragePool", "LpPool")
def _pool(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Pooling: batch and channel dims pass through; spatial dims are computed (frozen)."""
    families.leading(ctx, node.inputs[0], _tensors(ctx, node.outputs), 2)


@onnx_rule("Pad")
def _pad(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Padding: unpadded dims pass through; padded dims are computed (frozen)."""
    families.same_sizes(ctx, node.inputs[0], node.outputs[0])


@onnx_rule("Resize", "Upsample")
def _resize(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Resampling: dims that keep their size pass through; a ``sizes`` input follows the output dims."""
    x, out = node.inputs[0], node.outputs[0]
    families.same_sizes(ctx, x, out)
    so = _shape(ctx, out)
    sizes = _input(node, 3) if node.op_type == "Resize" else None
    if sizes is not None and ctx.is_tensor(sizes) and _numel(_shape(ctx, sizes)):
        _literal_sizes(ctx, node, 3, out, list(range(len(so))))


def _literal_sizes(ctx: OnnxRuleContext, node: ir.Node, index: int, out: ir.Value, dims: Sequence[int],
                   skip: Callable[[int], bool] = lambda _v: False) -> None:
    """Record which elements of a size vector are literals of output dims; freeze computed ones.

    Element ``k`` gives the size of output dim ``dims[k]``. A literal is rewritten; an element read from a
    tensor's size (``Shape``) is unified with that dim and follows by itself; an element computed by
    arithmetic on sizes freezes its dim.
    """
    vec = _input(node, index)
    values, origins = ctx.ints(vec), ctx.origins(vec)
    if values is None or origins is None:
        return
    od = ctx.dims(out)
    atoms: list[int | None] = []
    for k, (v, origin) in enumerate(zip(values, origins, strict=True)):
        if k >= len(dims) or skip(v):
            atoms.append(None)
            continue
        dim = dims[k]
        if origin is None:
            atoms.append(od[dim])
            continue
        atoms.append(None)
        if isinstance(origin, Computed):
            ctx.freeze_sources([origin], f"size read by arithmetic that sizes dim {dim} of '{out.name}'")
            if _shape(ctx, out)[dim] > 1:
                ctx.freeze([od[dim]], "size computed in the graph")
            continue
        name, src_dim = origin
        src = ctx.graph.value(name)
        if src is not None and ctx.is_tensor(src):
            ctx.unify(od[dim], ctx.dims(src)[src_dim])
    ctx.shape_input(node, index, atoms)


# The shape, indexing and quantisation rules register into the same table.
from secateurs.ir import onnx_shape_rules  # noqa: E402, F401
