"""Pass protocol for the ONNX IR: the same contract as :class:`secateurs.passes.base.Pass`, over an OnnxGraph."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from secateurs.errors import PassContractError
from secateurs.ir.onnx_graph import OnnxGraph

__all__ = ["OnnxPass", "OnnxPassManager", "OnnxPassResult"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OnnxPassResult:
    """What one ONNX pass did: the graph after it, whether it changed the model, and its record."""

    graph: OnnxGraph
    modified: bool
    record: Any = None


class OnnxPass:
    """Base class of passes over an :class:`OnnxGraph`.

    Subclasses set ``requires`` / ``provides`` (analysis result types) and ``transforms`` (True when they
    rewrite the model, which drops every analysis), and implement :meth:`run`.
    """

    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = ()
    transforms: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The pass's name (its class name)."""
        return type(self).__name__

    def run(self, graph: OnnxGraph) -> OnnxPassResult:
        """Run on ``graph``."""
        raise NotImplementedError

    def __call__(self, graph: OnnxGraph) -> OnnxPassResult:
        """Run with the requires / provides contract checked.

        Raises:
            PassContractError: A required analysis is missing, or a promised one was not provided.

        """
        for kind in self.requires:
            if kind not in graph.analyses:
                raise PassContractError(f"{self.name} requires {kind.__name__}; run the pass that provides it first")
        result = self.run(graph)
        for kind in self.provides:
            if kind not in result.graph.analyses:
                raise PassContractError(f"{self.name} promised {kind.__name__} but did not provide it")
        return result


class OnnxPassManager:
    """Runs ONNX passes in order, checking their contracts."""

    def __init__(self, passes: Sequence[OnnxPass]) -> None:
        """Create a manager over ``passes``.

        Raises:
            PassContractError: An element is not an ONNX pass.

        """
        for p in passes:
            if not isinstance(p, OnnxPass):
                raise PassContractError(f"{p!r} is not a secateurs ONNX pass")
        self.passes = list(passes)

    def __call__(self, graph: OnnxGraph) -> list[tuple[str, OnnxPassResult, float]]:
        """Run every pass on ``graph``; returns (name, result, seconds) per pass."""
        results: list[tuple[str, OnnxPassResult, float]] = []
        for p in self.passes:
            start = time.perf_counter()
            result = p(graph)
            elapsed = time.perf_counter() - start
            log.info("%s: modified=%s (%.2fs)", p.name, result.modified, elapsed)
            results.append((p.name, result, elapsed))
            graph = result.graph
        return results
