"""AnalyzeOnnxDependencies: build the coupled channel groups of an ONNX graph."""

from __future__ import annotations

from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.onnx_depgraph import analyze_onnx
from secateurs.ir.onnx_graph import OnnxGraph
from secateurs.ir.onnx_rules import OnnxOpRuleTable
from secateurs.passes.dependencies import DependencyRecord
from secateurs.passes.onnx_base import OnnxPass, OnnxPassResult

__all__ = ["AnalyzeOnnxDependencies"]


class AnalyzeOnnxDependencies(OnnxPass):
    """Analysis pass: run the ONNX op rule table and attach the result as :class:`DependencyInfo`.

    The attached object is an :class:`~secateurs.ir.onnx_depgraph.OnnxDependencyInfo`. Guarantees: graph
    inputs, graph outputs and every dim an unknown op touches are frozen with a reason.
    """

    provides = (DependencyInfo,)

    def __init__(self, rules: OnnxOpRuleTable | None = None) -> None:
        """Analyse with the op rule table ``rules`` (default: the built-in ONNX table)."""
        self.rules = rules

    def run(self, graph: OnnxGraph) -> OnnxPassResult:
        """Analyse ``graph``."""
        info = analyze_onnx(graph, self.rules)
        graph.analyses[DependencyInfo] = info
        return OnnxPassResult(graph, False, DependencyRecord.of(info))
