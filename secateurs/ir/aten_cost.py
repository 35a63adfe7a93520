"""The cost model of a captured PyTorch graph (the ATen side of :mod:`secateurs.ir.cost`).

:func:`aten_costs` hands the dialect-free :class:`~secateurs.ir.cost.CostModel` the graph's parameters and the
FLOP functions of the ATen rule table; the functions below are the counts the passes and reports read.
"""

from __future__ import annotations

import math

from torch import fx

from secateurs.ir.cost import CostModel, Shape
from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph, tensor_shape
from secateurs.ir.rules import RULES

__all__ = ["aten_costs", "count_flops", "flops_by_module", "per_channel_costs", "predict_cost"]


def count_flops(graph: Graph) -> float:
    """FLOPs of one call on the example inputs (see :mod:`secateurs.ir.cost` for what counts)."""
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


def _key(value: object) -> tuple[str, int] | None:
    return (value.name, -1) if isinstance(value, fx.Node) else None


def aten_costs(graph: Graph, info: DependencyInfo) -> CostModel:
    """The cost model of ``graph`` under its analysis ``info``.

    Parameters the graph never uses are counted unchanged; a tied weight (embeddings = LM head) is one tensor,
    counted once like :meth:`Graph.param_count`. FLOPs are counted by the rules of the table the analysis ran
    with (``info.rules``), so a rule added for one analysis also counts its op's FLOPs.
    """
    rules = RULES if info.rules is None else info.rules
    weights: list[tuple[str, int]] = []
    tracked = 0
    seen: set[int] = set()
    for placeholder, fqn in graph.params.items():
        key = (placeholder, -1)
        if key not in info.values:
            continue
        tensor = id(graph.module.get_parameter(fqn))
        if tensor in seen:
            continue
        seen.add(tensor)
        weights.append(key)
        tracked += math.prod(info.table.size(a) for a in info.values[key])
    terms = []
    for node in graph.nodes():
        entry = rules.get(node.target) if node.op == "call_function" else None
        if entry is not None and entry.flops is not None:
            terms.append((node, entry.flops))
    return CostModel(info, graph.param_count() - tracked, tuple(weights), terms, _key)


def predict_cost(graph: Graph, info: DependencyInfo, kept: dict[int, int]) -> tuple[int, float]:
    """Parameters and FLOPs after each group ``g`` is cut to ``kept[g]`` channels."""
    return aten_costs(graph, info).predict(kept)


def per_channel_costs(graph: Graph, info: DependencyInfo) -> dict[int, tuple[int, float]]:
    """Parameters and FLOPs saved by removing one channel from each prunable group (alone)."""
    return aten_costs(graph, info).per_channel()
