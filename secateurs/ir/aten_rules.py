# FX node arguments are dynamically typed (``Argument`` is a wide union); rules read them by schema position.
# mypy: disable-error-code="union-attr,arg-type,index,operator,misc"
"""Channel rules for ATen ops (the torch.export training IR).

Each function states how channels flow through one family of ops; ``op_rule`` registers it for explicit
overloads. Ops absent from this table freeze the channels they touch. This module holds the computing ops
(elementwise, linear algebra, conv, norms, pooling, reductions); :mod:`secateurs.ir.aten_shape_rules` the
shape, indexing and factory ops.
"""

from __future__ import annotations

import torch
from torch import fx

from secateurs.errors import UnsupportedOpError
from secateurs.ir import cost, families
from secateurs.ir.aten_args import arg as _arg
from secateurs.ir.aten_args import tensor_args as _tensor_args
from secateurs.ir.rules import RULES, RuleContext, ShapeOf, op_rule

__all__: list[str] = []

aten = torch.ops.aten


_dim = families.axis


# --------------------------------------------------------------------------------------------- elementwise
_ELEMENTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar, aten.div.Tensor_mode,
    aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar, aten.min.other, aten.max.other,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default, aten.bitwise_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.__and__.Tensor, aten.__or__.Tensor,
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.sigmoid.default, aten.tanh.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.hardsigmoid_.default, aten.hardtanh.default, aten.hardtanh_.default,
    aten.relu6.default, aten.leaky_relu.default, aten.leaky_relu_.default, aten.elu.default,
    aten.selu.default, aten.celu.default, aten.softplus.default, aten.mish.default, aten.glu.default,
    aten.clamp.default, aten.clamp.Tensor, aten.clamp_.default, aten.clamp_min.default,
    aten.clamp_max.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.neg.default,
    aten.abs.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.reciprocal.default,
    aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default, aten.square.default,
    aten.log1p.default, aten.expm1.default, aten.isnan.default, aten.isinf.default,
    aten.dropout.default, aten.dropout_.default, aten.alpha_dropout.default, aten.feature_dropout.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.detach_.default, aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype,
    aten.to.device, aten.to.dtype_layout, aten.to.other, aten.type_as.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
    aten.rand_like.default, aten.randn_like.default, aten.bernoulli.p,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.nan_to_num.default, aten.fill.Scalar, aten.fill_.Scalar, aten.copy_.default,
    aten.floor_divide.default, aten.remainder.Tensor, aten.remainder.Scalar, aten.fmod.Tensor, aten.fmod.Scalar,
]
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)


@op_rule(*_ELEMENTWISE)
def _elementwise(ctx: RuleContext, node: fx.Node) -> None:
    """Broadcasting op: every non-broadcast input dim is the same channels as the output dim.

    ``glu`` halves its dim and ``glu``'s halves are coupled; softmax normalises along a dim but keeps its
    channels, so both are elementwise here except for the checks below.
    """
    if node.target is aten.glu.default:
        (x,) = node.args[:1]
        shape = ctx.shape(x)
        assert shape is not None
        d = _dim(_arg(node, "dim", -1), len(shape))
        for i in range(len(shape)):
            if i != d:
                ctx.unify_dims(x, i, node, i)
        parts = ctx.split(ctx.dims(x)[d], "sum", (shape[d] // 2, shape[d] // 2))
        if parts is not None:
            ctx.unify(parts[0], parts[1])
            ctx.unify(parts[0], ctx.dims(node)[d])
        return
    if node.target in (aten.copy_.default,):
        ctx.broadcast(node.args[0], [node.args[1]])
    families.elementwise(ctx, [node], _tensor_args(ctx, node),
                         normalises=(node.args[0], int(node.args[1])) if node.target in _SOFTMAX else None)


@op_rule(aten.triu.default, aten.tril.default)
def _positional(ctx: RuleContext, node: fx.Node) -> None:
    """Triu / tril depend on positions along the last two dims: those are frozen."""
    x = node.args[0]
    ctx.same_dims(x, node)
    ctx.freeze(ctx.dims(node)[-2:], "position-dependent op")


@op_rule(aten.roll.default, aten.flip.default, aten.cumsum.default, aten.diff.default)
def _reorder(ctx: RuleContext, node: fx.Node) -> None:
    """Ops that mix positions along some dims: those dims are frozen, the others pass through."""
    x = node.args[0]
    if node.target is aten.diff.default:
        dims = [_arg(node, "dim", -1)]
    elif node.target is aten.roll.default:
        dims = list(_arg(node, "dims", [])) or list(range(len(families.static_shape(ctx, x))))
    elif node.target is aten.flip.default:
        dims = list(node.args[1])
    else:
        dims = [_arg(node, "dim")]
    families.along_dims(ctx, x, [node], dims, "position-dependent op")


@op_rule(aten.topk.default, aten.sort.default, aten.sort.stable)
def _select_along(ctx: RuleContext, node: fx.Node) -> None:
    """Top-k / sort: positions along ``dim`` are reordered or selected (frozen); the other dims pass through."""
    outs = [(node, i) for i in range(len(node.meta["val"]))]
    families.along_dims(ctx, node.args[0], outs, [_arg(node, "dim", -1)], "sorted or selected along this dim")


@op_rule(aten.histc.default)
def _histc(ctx: RuleContext, node: fx.Node) -> None:
    """A histogram counts every input value (MoE routing counts expert ids): nothing passes through."""
    ctx.freeze_value(node.args[0], "counted by a histogram")
    ctx.freeze_value(node, "histogram bins")


@op_rule(aten.repeat_interleave.self_int)
def _repeat_interleave(ctx: RuleContext, node: fx.Node) -> None:
    """Each position along ``dim`` repeated ``r`` times in place: that dim is ``channels x r``."""
    x, repeats = node.args[0], int(node.args[1])
    rank = len(families.static_shape(ctx, x))
    raw = _arg(node, "dim")
    if raw is None:
        ctx.freeze_value(x, "repeat_interleave of the flattened tensor")
        ctx.freeze_value(node, "repeat_interleave of the flattened tensor")
        return
    d = _dim(int(raw), rank)
    for i in range(rank):
        if i != d:
            ctx.unify_dims(x, i, node, i)
    ctx.unify(ctx.dims(node)[d], ctx.product([ctx.dims(x)[d], ctx.new(repeats)]))


@op_rule(aten._weight_norm.default)
def _weight_norm(ctx: RuleContext, node: fx.Node) -> None:
    """``v * g / ||v||`` with the norm over every dim but ``dim``: those dims are frozen (the norm reads them)."""
    v, g = node.args[0], node.args[1]
    d = _dim(int(_arg(node, "dim", 0)), len(families.static_shape(ctx, v)))
    ctx.same_dims(v, node)
    ctx.broadcast(node, [g])
    ctx.freeze([a for i, a in enumerate(ctx.dims(v)) if i != d], "weight norm over these dims")


# ------------------------------------------------------------------------------------------- linear algebra
def _linear_flops(node: fx.Node, shape_of: ShapeOf) -> float:
    w = shape_of(node.args[1])
    return cost.matmul_flops(shape_of(node), w[1] if w else 0)


@op_rule(aten.linear.default, flops=_linear_flops)
def _linear(ctx: RuleContext, node: fx.Node) -> None:
    """Y = x W^T + b: x[..., in] ~ W[:, in]; W[out, :] ~ b ~ y[..., out]."""
    x, w = node.args[0], node.args[1]
    b = _arg(node, "bias")
    families.linear(ctx, x, w, node, b if isinstance(b, fx.Node) else None)
    ctx.consumer(x, len(families.static_shape(ctx, x)) - 1, w, 1)


def _matmul_flops(node: fx.Node, shape_of: ShapeOf) -> float:
    a = shape_of(node.args[0])
    return cost.matmul_flops(shape_of(node), a[-1] if a else 0)


def _matmul_core(ctx: RuleContext, node: fx.Node, a: fx.Node, b: fx.Node) -> None:
    families.matmul(ctx, a, b, node)
    families.attention_product(ctx, a, b, node)
    if b.op == "placeholder":
        ctx.consumer(a, len(ctx.shape(a)) - 1, b, len(ctx.shape(b)) - 2)


@op_rule(aten.matmul.default, aten.bmm.default, aten.mm.default, flops=_matmul_flops)
def _matmul(ctx: RuleContext, node: fx.Node) -> None:
    """Batched matrix product: a[..., k] ~ b[..., k, :]; rows of a and columns of b pass through."""
    _matmul_core(ctx, node, node.args[0], node.args[1])


def _grouped_mm_flops(node: fx.Node, shape_of: ShapeOf) -> float:
    return cost.grouped_mm_flops(shape_of(node.args[0]), shape_of(node.args[1]))


def _grouped_mm(ctx: RuleContext, node: fx.Node) -> None:
    """Grouped matmul of MoE experts: tokens sorted by expert, ``[S, in] x [E, in, out] -> [S, out]``.

    ``offs[e]`` ends expert ``e``'s run of tokens. Every expert's matrix shares the input and output channel
    spaces, so a neuron group spans all experts (the same neurons leave every expert, as one fused tensor must
    keep one size); the expert dim follows ``offs``, which the routing computes (frozen).
    """
    x, w = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else _arg(node, "offs")
    sx, sw = families.static_shape(ctx, x), families.static_shape(ctx, w)
    if len(sx) != 2 or len(sw) != 3:
        raise UnsupportedOpError(f"{ctx.where()}: grouped_mm of a {len(sx)}-d input and {len(sw)}-d weight (the "
                                 "rule knows 2-d tokens by 3-d expert weights)")
    ctx.unify_dims(x, 1, w, 1)
    ctx.unify_dims(x, 0, node, 0)
    ctx.unify_dims(w, 2, node, 1)
    if isinstance(offs, fx.Node) and ctx.is_tensor(offs):
        ctx.unify_dims(w, 0, offs, 0)


RULES.register([aten._grouped_mm.default], _grouped_mm, _grouped_mm_flops)
RULES.register_named(["transformers.grouped_mm_fallback.default"], _grouped_mm, _grouped_mm_flops)


def _addmm_flops(node: fx.Node, shape_of: ShapeOf) -> float:
    a = shape_of(node.args[1])
    return cost.matmul_flops(shape_of(node), a[-1] if a else 0)


@op_rule(aten.addmm.default, aten.baddbmm.default, flops=_addmm_flops)
def _addmm(ctx: RuleContext, node: fx.Node) -> None:
    """Bias + a @ b (the form Hugging Face's GPT-2 Conv1D takes)."""
    _matmul_core(ctx, node, node.args[1], node.args[2])
    ctx.broadcast(node, [node.args[0]])


def _sdpa_flops(node: fx.Node, shape_of: ShapeOf) -> float:
    q, k, v = (shape_of(a) for a in node.args[:3])
    return cost.attention_flops(q, k, v)


@op_rule(aten.scaled_dot_product_attention.default, flops=_sdpa_flops)
def _sdpa(ctx: RuleContext, node: fx.Node) -> None:
    """softmax(q k^T) v over heads (:func:`~secateurs.ir.families.attention`; ``enable_gqa``: fewer kv heads)."""
    q, k, v = node.args[:3]
    mask = _arg(node, "attn_mask")
    families.attention(ctx, q, k, v, node, mask if isinstance(mask, fx.Node) else None)


# -------------------------------------------------------------------------------------------------- conv
def _conv_flops(node: fx.Node, shape_of: ShapeOf) -> float:
    w = shape_of(node.args[1])
    out = shape_of(node)
    if not w or not out:
        return 0.0
    if node.target in _CONV_T or bool(_arg(node, "transposed", False)):
        return cost.conv_transpose_flops(shape_of(node.args[0]), w)
    return cost.conv_flops(out, w)


_CONV = [aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding]
_CONV_T = [aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input]


@op_rule(*_CONV, *_CONV_T, flops=_conv_flops)
def _conv(ctx: RuleContext, node: fx.Node) -> None:
    """Convolution with groups.

    Channels are ``groups x per_group`` on both sides: input C = G x Ci ~ weight dim 1 (Ci), weight dim 0
    (output) = G x Co ~ output C ~ bias. For a transposed conv the weight is [Cin, Cout/G, ...]. Spatial
    output dims are computed by the op and stay frozen.
    """
    x, w = node.args[0], node.args[1]
    b = _arg(node, "bias")
    groups = int(_arg(node, "groups", 1) or 1)
    transposed = node.target in _CONV_T or bool(_arg(node, "transposed", False))
    g = families.conv(ctx, x, w, node, b if isinstance(b, fx.Node) else None, groups=groups, transposed=transposed)
    if groups == 1:
        cdim = 1 if len(ctx.shape(x)) == len(ctx.shape(w)) else 0
        ctx.consumer(x, cdim, w, 0 if transposed else 1)
    else:
        ctx.module_attr(w, "groups", g)


# ------------------------------------------------------------------------------------------------- norms
@op_rule(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
         aten.instance_norm.default, aten.native_batch_norm.default,
         aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default)
def _batch_norm(ctx: RuleContext, node: fx.Node) -> None:
    """Per-channel normalisation over dim 1 (:func:`secateurs.ir.families.per_channel_norm`)."""
    multi = isinstance(node.meta.get("val"), (list, tuple))
    out = (node, 0) if multi else node
    params = [a for a in node.args[1:5] if isinstance(a, fx.Node) and ctx.is_tensor(a)]
    stats = [(node, i) for i in range(1, len(node.meta["val"]))] if multi else []
    families.per_channel_norm(ctx, node.args[0], out, params, [v for v in stats if ctx.is_tensor(v)],
                              instance=node.target is aten.instance_norm.default)


@op_rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def _layer_norm(ctx: RuleContext, node: fx.Node) -> None:
    """Normalisation over the trailing ``normalized_shape`` dims (channels mix in the statistics).

    With no affine weight the normalised size is a literal in the graph, so those dims are frozen.
    """
    x = node.args[0]
    normalized = list(node.args[1])
    weight = node.args[2] if len(node.args) > 2 else _arg(node, "weight")
    bias = _arg(node, "bias") if node.target is not aten.rms_norm.default else None
    out = (node, 0) if isinstance(node.meta.get("val"), (list, tuple)) else node
    sx = families.static_shape(ctx, x)
    k = len(normalized)
    families.normalise_over(ctx, x, out, [t for t in (weight, bias) if isinstance(t, fx.Node)], len(sx) - k)
    if not isinstance(weight, fx.Node):
        ctx.freeze(ctx.dims(x)[len(sx) - k:], "normalised shape is a literal (no affine weight)")
    if out is not node:
        for i in range(1, len(node.meta["val"])):
            ctx.freeze_value((node, i), "normalisation statistics output")


@op_rule(aten.group_norm.default, aten.native_group_norm.default)
def _group_norm(ctx: RuleContext, node: fx.Node) -> None:
    """GroupNorm: C = groups x per_group; the weight covers C; whole groups or per-group slots prune."""
    x = node.args[0]
    if node.target is aten.group_norm.default:
        groups = int(node.args[1])
        weight, bias = _arg(node, "weight"), _arg(node, "bias")
    else:
        weight, bias = node.args[1], node.args[2]
        groups = int(node.args[6])
    out = (node, 0) if isinstance(node.meta.get("val"), (list, tuple)) else node
    parts = families.group_norm(ctx, x, out, groups, [t for t in (weight, bias) if isinstance(t, fx.Node)])
    if parts is not None and isinstance(weight, fx.Node):
        ctx.module_attr(weight, "num_groups", parts[0])
    elif parts is not None:
        ctx.freeze([parts[0]], "group count is a literal (no affine weight)")
    if out is not node:
        for i in range(1, len(node.meta["val"])):
            ctx.freeze_value((node, i), "normalisation statistics output")


@op_rule(aten.embedding.default)
def _embedding(ctx: RuleContext, node: fx.Node) -> None:
    """Lookup: rows (vocabulary) are indexed and frozen; the embedding dim is the output's last dim."""
    families.gather(ctx, node.args[0], [node], 0, node.args[1], "embedding rows are indexed by token ids")


# ---------------------------------------------------------------------------------------------- pooling
_POOL = [
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
    aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default,
    aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
    aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
    aten.upsample_bilinear2d.vec, aten.upsample_linear1d.vec, aten.upsample_bicubic2d.vec,
    aten.upsample_trilinear3d.vec, aten.upsample_nearest2d.default, aten.upsample_bilinear2d.default,
    aten._adaptive_avg_pool2d.default,
]
_SPATIAL_RANK = {}
for _op in _POOL:
    _name = str(_op)
    _SPATIAL_RANK[_op] = 3 if "3d" in _name else (1 if "1d" in _name else 2)


@op_rule(*_POOL)
def _pool(ctx: RuleContext, node: fx.Node) -> None:
    """Pooling / resampling: leading (batch, channel) dims pass through, spatial dims are computed."""
    x = node.args[0]
    sx = ctx.shape(x)
    assert sx is not None
    outs = [(node, i) for i in range(len(node.meta["val"]))] if isinstance(node.meta.get("val"), (list, tuple)) \
        else [node]
    families.leading(ctx, x, outs, len(sx) - _SPATIAL_RANK[node.target])


@op_rule(aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad2d.default,
         aten.replication_pad2d.default, aten.reflection_pad1d.default)
def _pad(ctx: RuleContext, node: fx.Node) -> None:
    """Padding: unpadded dims pass through; padded dims are computed (frozen)."""
    families.same_sizes(ctx, node.args[0], node)


# ------------------------------------------------------------------------------------------- reductions
_REDUCE = [
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
    aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.norm.ScalarOpt_dim,
    aten.linalg_vector_norm.default, aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default,
    aten.var_mean.correction, aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.mean.default,
    aten.sum.default, aten.max.default, aten.min.default,
]


@op_rule(*_REDUCE)
def _reduce(ctx: RuleContext, node: fx.Node) -> None:
    """Reduction over some dims: the kept dims pass through, reduced ones vanish (or become size 1)."""
    x = node.args[0]
    sx = ctx.shape(x)
    assert sx is not None
    rank = len(sx)
    raw = node.args[1] if len(node.args) > 1 else _arg(node, "dim")
    if node.target in (aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim):
        raw = node.args[2] if len(node.args) > 2 else _arg(node, "dim")
    if node.target in (aten.mean.default, aten.sum.default, aten.max.default, aten.min.default):
        raw = None
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        dims = set(range(rank))
    elif isinstance(raw, (list, tuple)):
        dims = {_dim(int(d), rank) for d in raw}
    else:
        dims = {_dim(int(raw), rank)}
    outs = [(node, i) for i in range(len(node.meta["val"]))] if isinstance(node.meta.get("val"), (list, tuple)) \
        else [node]
    families.reduce(ctx, x, outs, dims)


# The shape, indexing and factory ops live in their own module; importing it registers them.
from secateurs.ir import aten_shape_rules  # noqa: E402, F401
