"""Parameter and FLOP counts of a captured graph, now or under a pruning plan."""

from __future__ import annotations

import math

from torch import fx

from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph, tensor_shape
from secateurs.ir.rules import RULES, Shape

__all__ = ["count_flops", "flops_by_module", "per_channel_costs", "predict_cost"]


def count_flops(graph: Graph) -> float:
    """FLOPs of one call on the example inputs (a multiply-add counts 2; only matmul-like ops count).

    Counted ops: linear, matmul / mm / bmm / addmm / baddbmm, convolutions and scaled-dot-product attention.
    """
    total = 0.0
    for node in graph.nodes():
        entry = RULES.get(node.target) if node.op == "call_function" else None
        if entry is not None and entry.flops is not None:
            total += entry.flops(node, _actual_shape)
    return total


def flops_by_module(graph: Graph) -> dict[str, float]:
    """FLOPs of one call split by the innermost module that issued each op (``""`` for top-level code)."""
    out: dict[str, float] = {}
    for node in graph.nodes():
        entry = RULES.get(node.target) if node.op == "call_function" else None
        if entry is None or entry.flops is None:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = str(list(stack.values())[-1][0]) if stack else ""
        out[path] = out.get(path, 0.0) + entry.flops(node, _actual_shape)
    return out


def _actual_shape(value: object) -> Shape | None:
    if isinstance(value, fx.Node):
        return tensor_shape(value.meta.get("val"))
    return None


def predict_cost(graph: Graph, info: DependencyInfo, kept: dict[int, int]) -> tuple[int, float]:
    """Parameters and FLOPs after each group ``g`` is cut to ``kept[g]`` channels.

    Parameters the graph never uses are counted unchanged. FLOPs are counted by the rules of the table the
    analysis ran with (``info.rules``), so a rule added for one analysis also counts its op's FLOPs.
    """
    rules = RULES if info.rules is None else info.rules
    memo: dict[int, int] = {}

    def shape_of(value: object) -> Shape | None:
        if isinstance(value, fx.Node) and (value.name, -1) in info.values:
            return info.shape_under((value.name, -1), kept, memo)
        return None

    params = graph.param_count()
    seen: set[int] = set()  # a tied weight (embeddings = LM head) is one tensor, counted once like param_count
    for placeholder, fqn in graph.params.items():
        key = (placeholder, -1)
        if key not in info.values:
            continue
        tensor = id(graph.module.get_parameter(fqn))
        if tensor in seen:
            continue
        seen.add(tensor)
        before = math.prod(info.table.size(a) for a in info.values[key])
        params += math.prod(info.shape_under(key, kept, memo)) - before
    flops = 0.0
    for node in graph.nodes():
        entry = rules.get(node.target) if node.op == "call_function" else None
        if entry is not None and entry.flops is not None:
            flops += entry.flops(node, shape_of)
    return params, flops


def per_channel_costs(graph: Graph, info: DependencyInfo) -> dict[int, tuple[int, float]]:
    """Parameters and FLOPs saved by removing one channel from each prunable group (alone)."""
    params0, flops0 = predict_cost(graph, info, {})
    out: dict[int, tuple[int, float]] = {}
    for g in info.iter_groups():
        p, f = predict_cost(graph, info, {g.id: g.size - 1})
        out[g.id] = (params0 - p, flops0 - f)
    return out
