"""Dependency analysis of an ONNX graph: run the ONNX op rule table and build coupled channel groups.

The result is a :class:`~secateurs.ir.depgraph.DependencyInfo` (values keyed ``(value name, -1)``, members
naming initializers), so the selection logic of the PyTorch path (:func:`secateurs.passes.channel_plan.plan_keep`)
runs on it unchanged. It also carries the literals the rewrite must change (Reshape targets, Slice bounds,
Conv groups) and can predict parameters and FLOPs under a plan.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from secateurs.errors import CaptureError, UnsupportedOpError
from secateurs.ir.atoms import AtomTable
from secateurs.ir.cost import CostModel
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo, FrozenGroup, Member
from secateurs.ir.onnx_graph import OnnxGraph
from secateurs.ir.onnx_rules import (
    ONNX_RULES,
    SIZE_INPUTS,
    AttrSize,
    OnnxFlopFn,
    OnnxOpRuleTable,
    OnnxRuleContext,
    ShapeInput,
    SliceBound,
)

__all__ = ["Cut", "OnnxDependencyInfo", "analyze_onnx", "onnx_costs"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cut:
    """A node whose statistics run over a pruned axis, with the keep masks of the values around it.

    Attributes:
        node: The node's name (unique in the graph).
        masks: Value name -> per-dim keep masks, for every input and output of the node the analysis saw.

    """

    node: str
    masks: dict[str, list[np.ndarray]]


@dataclasses.dataclass
class OnnxDependencyInfo(DependencyInfo):
    """:class:`DependencyInfo` of an ONNX graph, plus the literals that follow channel atoms.

    Attributes:
        shape_inputs: Integer inputs (Reshape targets, Expand shapes, Split sizes) whose elements are sizes.
        slice_bounds: Slice starts / ends that are positions along channel dims.
        attr_sizes: Integer attributes that are sizes (a Conv's ``group``).
        flop_nodes: Nodes with a FLOP count, with its function.
        params: Initializers scored as weights (floating point, or quantised weights).

    """

    shape_inputs: list[ShapeInput] = dataclasses.field(default_factory=list)
    slice_bounds: list[SliceBound] = dataclasses.field(default_factory=list)
    attr_sizes: list[AttrSize] = dataclasses.field(default_factory=list)
    flop_nodes: list[tuple[ir.Node, OnnxFlopFn]] = dataclasses.field(default_factory=list)
    params: frozenset[str] = frozenset()



def onnx_costs(graph: OnnxGraph, info: OnnxDependencyInfo) -> CostModel:
    """The cost model of an analysed ONNX graph (the ONNX side of :mod:`secateurs.ir.cost`).

    Parameters are the scored weights (``info.params``); FLOPs come from the nodes the op rules gave a FLOP
    function, with the static shape of every value the analysis does not track.
    """

    def key(value: ir.Value | None) -> tuple[str, int] | None:
        return (value.name, -1) if value is not None and value.name else None

    return CostModel(info, 0, tuple((name, -1) for name in sorted(info.params)), info.flop_nodes, key, graph.shape)


def _classify(group: ChannelGroup, tags: dict[int, set[str]], ctx: OnnxRuleContext) -> str:
    """Name a group's structure from rule tags, normalisation and the kinds of ops its weights feed."""
    table, values = ctx.table, ctx.values
    own = tags.get(group.id, set())
    if "heads" in own:
        for m in group.members:
            siblings = table.leaves(values[(m.placeholder, -1)][m.dim])
            if any(leaf != group.id and "copies" in tags.get(leaf, set()) for leaf in siblings):
                return "kv_groups"
        return "kv_groups" if "kv_groups" in own else "heads"
    if "kv_groups" in own:
        return "kv_groups"
    if group.mixed_at is not None:
        return "hidden"
    linear = 0
    for m in group.members:
        if not m.is_param:
            continue
        rank = len(ctx.graph.shapes.get(m.placeholder, ()))
        if m.placeholder in ctx.linear_weights and rank >= 2:
            linear += 1
        elif rank >= 2:
            return "channels"
    if linear >= 2:
        return "heads" if group.stride > 1 else "ffn"
    return "channels"


def _captured(node: ir.Node, main: ir.Graph) -> list[ir.Value]:
    """Values of the main graph that a node's subgraphs read."""
    out: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for sub in graphs:
            for inner in sub.all_nodes():
                out.extend(v for v in inner.inputs if v is not None and v.graph is main)
    return out


def analyze_onnx(graph: OnnxGraph, rules: OnnxOpRuleTable | None = None) -> OnnxDependencyInfo:
    """Propagate channels through an ONNX graph with the op rule table ``rules`` (default: :data:`ONNX_RULES`).

    Graph inputs, graph outputs, unknown ops, values without a static shape, values read inside subgraphs
    and every dim whose size an op computes are frozen.

    Returns:
        The dependency information: prunable channel groups and frozen ones with reasons.

    """
    table = AtomTable()
    values: dict[tuple[str, int], list[int]] = {}
    ctx = OnnxRuleContext(table, values, graph)
    unsupported: list[str] = []
    flop_nodes: list[tuple[ir.Node, OnnxFlopFn]] = []
    g = graph.graph
    initializers = {name: v for name, v in g.initializers.items() if ctx.is_tensor(v)}
    for init in initializers.values():
        ctx.dims(init)
    for inp in g.inputs:
        if not inp.is_initializer() and ctx.is_tensor(inp):
            ctx.freeze_value(inp, "graph input")
        elif inp.is_initializer() and ctx.is_tensor(inp):
            ctx.freeze_value(inp, "initializer that is also a graph input (the caller may replace it)")
    for node in g:
        ctx.current = node
        ctx.linked = set()
        where = ctx.where()
        for v in _captured(node, g):
            ctx.freeze_value(v, f"read inside a subgraph of {where}")
        outs = [o for o in node.outputs if o.name and ctx.is_tensor(o)]
        named = [o for o in node.outputs if o.name]
        if outs and len(outs) == len(named) and all((o.name or "") in graph.consts for o in outs):
            # Computed from shapes and constants only: a constant of the analysis, not a channel by itself; an op
            # that ties one of its dims to a weight's (an index tensor of a gather) freezes those channels.
            for o in outs:
                ctx.freeze(ctx.dims(o), "computed from sizes and constants", channel=None)
            continue
        for o in outs:
            ctx.dims(o)
        entry = (ONNX_RULES if rules is None else rules).get(node.domain, node.op_type)
        op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        label = f"{node.name or '?'} ({op})"
        # Sizes read through shape arithmetic must not change, except where a rule tracks them (Reshape targets).
        aware = SIZE_INPUTS.get(node.op_type, frozenset()) if entry is not None and not node.domain else frozenset()
        for i, arg in enumerate(node.inputs):
            origins = graph.origins.get(arg.name or "") if arg is not None and i not in aware else None
            if origins:
                ctx.freeze_sources(origins, f"size read by {where}")
        missing = [v for v in [*node.inputs, *node.outputs] if v is not None and v.name and not ctx.is_tensor(v)]
        if entry is None or missing:
            reason = f"unsupported op {op}" if entry is None else f"{op} with a value of unknown shape"
            unsupported.append(label if entry is None else f"{label}: shape of '{missing[0].name}' unknown")
            for arg in node.inputs:
                if arg is not None and ctx.is_tensor(arg):
                    ctx.freeze_value(arg, f"input of {reason}")
            for o in outs:
                ctx.freeze_value(o, f"output of {reason}")
            continue
        try:
            entry.rule(ctx, node)
        except UnsupportedOpError as exc:  # a form the rule does not decode: freeze what the node touches, report
            why = f"the op rule cannot handle this node: {exc}"
            unsupported.append(f"{label}: {exc}")
            for arg in [*node.inputs, *outs]:
                if arg is not None and ctx.is_tensor(arg):
                    ctx.freeze_value(arg, why)
            continue
        except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            # A rule indexes shapes and attributes the ONNX spec promises; a file that breaks them is malformed.
            raise CaptureError(f"node '{node.name}' ({node.op_type}) in '{graph.path}' does not match the ONNX "
                               f"spec for its op: {type(exc).__name__}: {exc}") from exc
        if entry.flops is not None:
            flop_nodes.append((node, entry.flops))
        for o in outs:
            unlinked = [a for a in ctx.dims(o) if a not in ctx.linked and table.size(a) > 1]
            if unlinked:
                ctx.freeze(unlinked, "size computed by the op", channel=False)
    ctx.current = None
    for i, o in enumerate(g.outputs):
        if ctx.is_tensor(o):
            ctx.freeze_value(o, f"graph output #{i} '{o.name}'")
            ctx.freeze_sources(graph.origins.get(o.name or "", ()), f"size returned as graph output #{i}")
    for name, v in initializers.items():
        for d, atom in enumerate(ctx.dims(v)):
            if atom not in ctx.ever_linked and table.size(atom) > 1:
                table.freeze(atom, f"dim {d} of '{graph.display_name(name)}' is not a channel dim of any op "
                             "that uses it", channel=False)
    buffers = graph.buffers | ctx.buffers
    params = frozenset(
        name for name, v in initializers.items()
        if name not in buffers and v.const_value is not None
        and (v.const_value.dtype.is_floating_point() or name in ctx.params)
    )
    frozen_leaves = table.frozen_leaves()
    mixed = table.mixed_leaves()
    tags = table.tagged_leaves()
    members: dict[int, list[Member]] = {}
    for name in initializers:
        shape = graph.shapes[name]
        for d, atom in enumerate(values[(name, -1)]):
            for leaf in table.leaves(atom):
                if table.size(leaf) <= 1:
                    continue
                stride = table.others_in_product(atom, leaf)
                per = math.prod(shape) // max(shape[d], 1) * stride
                members.setdefault(leaf, []).append(
                    Member(name, graph.display_name(name), d, name in params, stride, per)
                )
    groups: dict[int, ChannelGroup] = {}
    frozen: list[FrozenGroup] = []
    for leaf, mem in members.items():
        if not any(m.is_param for m in mem):
            continue
        size = table.size(leaf)
        if leaf in frozen_leaves:
            reason, is_channel = frozen_leaves[leaf]
            if is_channel is not False:
                frozen.append(FrozenGroup(size, tuple(sorted({f"{m.name}[{m.dim}]" for m in mem})), reason))
            continue
        per = sum(m.numel_per_channel for m in mem if m.is_param)
        group = ChannelGroup(leaf, size, tuple(mem), per, mixed.get(leaf))
        group.kind = _classify(group, tags, ctx)
        groups[leaf] = group
    log.debug("ONNX analysis: %d groups, %d frozen, %d unsupported ops", len(groups), len(frozen), len(unsupported))
    return OnnxDependencyInfo(
        table, values, groups, frozen, [], [], unsupported, ctx.mixing,
        shape_inputs=ctx.shape_inputs, slice_bounds=ctx.slice_bounds, attr_sizes=ctx.attr_sizes,
        flop_nodes=flop_nodes, params=params,
    )

