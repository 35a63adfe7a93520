"""The ONNX dialect of the pass manager: graph invariants and transactions over an :class:`OnnxGraph`.

ONNX passes are ordinary :class:`~secateurs.passes.base.Pass` subclasses whose ``run`` takes an
:class:`OnnxGraph`; :class:`~secateurs.passes.base.PassManager` runs them with this dialect. A transaction keeps a
copy of the model's structure (``ir.Model.clone``: graphs, nodes and values copied, tensors shared, so it costs
no weight memory) and the graph's static facts; a rollback puts them back and checks, node by node and
initializer by initializer, that the model is the one the pass started from.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from secateurs.errors import PassContractError
from secateurs.ir.cost import CostModel
from secateurs.ir.onnx_depgraph import OnnxDependencyInfo, onnx_costs
from secateurs.ir.onnx_graph import OnnxGraph
from secateurs.passes.base import Pass, PassManager, PassResult, Transaction, register_dialect

__all__ = ["OnnxPass", "OnnxPassManager", "OnnxPassResult", "onnx_fingerprint", "onnx_invariants"]

OnnxPass = Pass
"""Alias of :class:`~secateurs.passes.base.Pass` (one pass class for both IRs)."""
OnnxPassResult = PassResult
"""Alias of :class:`~secateurs.passes.base.PassResult`."""
OnnxPassManager = PassManager
"""Alias of :class:`~secateurs.passes.base.PassManager` (one manager for both IRs)."""

_FACTS = ("shapes", "dtypes", "consts", "origins", "symbols", "display", "buffers", "untied")


def onnx_fingerprint(model: ir.Model) -> tuple[Any, ...]:
    """What a rollback must restore, read without tensor data.

    Every node (op, inputs, outputs, attributes) and initializer (name, shape, dtype, tensor identity) of the
    main graph, and its inputs and outputs.
    """
    g = model.graph

    def name(v: ir.Value | None) -> str:
        return "" if v is None else v.name or ""

    nodes = tuple((n.domain, n.op_type, n.name, tuple(name(v) for v in n.inputs), tuple(name(v) for v in n.outputs),
                   tuple(sorted((k, repr(a.value)) for k, a in n.attributes.items()
                                if a.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS))))
                  for n in g)
    inits = tuple((k, str(v.shape), str(v.dtype), id(v.const_value)) for k, v in g.initializers.items())
    io = tuple((name(v), str(v.shape)) for v in (*g.inputs, *g.outputs))
    return nodes, inits, io


def onnx_invariants(graph: OnnxGraph) -> list[str]:
    """Invariants every ONNX graph between passes satisfies; returns the violations.

    - every initializer's declared shape equals its tensor's shape;
    - every node input of the main graph is a graph input, an initializer, or the output of an earlier node;
    - every graph output is produced.
    """
    g = graph.graph
    problems: list[str] = []
    for key, value in g.initializers.items():
        tensor = value.const_value
        if tensor is not None and value.shape is not None and tuple(value.shape) != tuple(tensor.shape):
            problems.append(f"initializer '{key}': declared shape {value.shape} != tensor shape {tensor.shape}")
    known = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
    for node in g:
        for v in node.inputs:
            if v is not None and id(v) not in known and v.graph is g:
                problems.append(f"node '{node.name or node.op_type}' reads '{v.name}' before it is produced")
        known.update(id(o) for o in node.outputs)
    problems.extend(f"graph output '{v.name}' is not produced" for v in g.outputs if id(v) not in known)
    return problems


class _OnnxTransaction:
    """A structural copy of the model and copies of the graph's static facts, taken before a transform."""

    def __init__(self, graph: OnnxGraph) -> None:
        self.graph = graph
        self.copy = graph.model.clone()
        self.before = onnx_fingerprint(graph.model)
        self.facts = {k: _shallow(getattr(graph, k)) for k in _FACTS}

    def commit(self) -> None:
        del self.copy

    def rollback(self) -> list[str]:
        self.graph.model = self.copy
        for key, value in self.facts.items():
            setattr(self.graph, key, value)
        self.graph.invalidate()  # analyses name the nodes of the model that was rewritten: dropped
        return [] if onnx_fingerprint(self.graph.model) == self.before else ["the copied model differs from the "
                                                                             "model before the pass"]


def _shallow(value: Any) -> Any:
    return type(value)(value) if isinstance(value, (dict, set)) else value


class _OnnxDialect:
    """The ONNX graph."""

    def invariants(self, graph: OnnxGraph) -> list[str]:
        return onnx_invariants(graph)

    def begin(self, graph: OnnxGraph, transactional: bool) -> Transaction:
        return _OnnxTransaction(graph)

    def drop_analyses(self, graph: OnnxGraph, keep: tuple[type, ...]) -> None:
        kept = {k: v for k, v in graph.analyses.items() if k in keep}
        graph.invalidate()
        graph.analyses.update(kept)

    def cost_model(self, graph: OnnxGraph, info: Any) -> CostModel:
        if not isinstance(info, OnnxDependencyInfo):
            raise PassContractError("an ONNX graph is costed with its own dependency analysis (AnalyzeOnnxDependencies)")
        return onnx_costs(graph, info)


register_dialect(OnnxGraph, _OnnxDialect())
