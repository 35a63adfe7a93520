"""Pass protocol and the pass manager."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from secateurs.errors import PassContractError
from secateurs.ir.graph import Graph, tensor_shape
from secateurs.modeling.rewrite import check_module_attributes
from secateurs.progress import track

__all__ = ["Pass", "PassManager", "PassResult", "PipelineResult", "graph_invariants"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult:
    """What one pass did.

    Attributes:
        graph: The graph after the pass (a new capture after a transform that changed the model).
        modified: Whether the model changed.
        record: A typed record for the report (the pass's own dataclass), or None.

    """

    graph: Graph
    modified: bool
    record: Any = None


@dataclasses.dataclass
class PipelineResult:
    """Result of a :class:`PassManager` run: the final graph and each pass's result, in order."""

    graph: Graph
    results: list[tuple[str, PassResult, float]]

    @property
    def module(self) -> Any:
        """The (rewritten in place) module."""
        return self.graph.module

    @property
    def modified(self) -> bool:
        """Whether any pass changed the model."""
        return any(r.modified for _, r, _ in self.results)

    def record(self, kind: type) -> Any:
        """The last record of type ``kind``, or None."""
        for _, r, _ in reversed(self.results):
            if isinstance(r.record, kind):
                return r.record
        return None


class Pass:
    """Base class of every pass.

    Subclasses set ``requires`` (analysis result types that must be present), ``provides`` (the types
    they add) and ``transforms`` (True when they rewrite the model, which drops every analysis), and
    implement :meth:`run`.
    """

    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = ()
    transforms: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The pass's name (its class name)."""
        return type(self).__name__

    def run(self, graph: Graph) -> PassResult:
        """Run on ``graph``."""
        raise NotImplementedError

    def __call__(self, graph: Graph) -> PassResult:
        """Run with the requires / provides contract checked."""
        for kind in self.requires:
            if kind not in graph.analyses:
                raise PassContractError(f"{self.name} requires {kind.__name__}; run the pass that provides it first")
        result = self.run(graph)
        for kind in self.provides:
            if kind not in result.graph.analyses:
                raise PassContractError(f"{self.name} promised {kind.__name__} but did not provide it")
        return result


def graph_invariants(graph: Graph) -> list[str]:
    """Invariants every graph between passes satisfies; returns the violations.

    - every parameter placeholder's traced shape equals the module's parameter shape;
    - every known module's size attributes agree with its tensors (``in_features`` with ``weight``, ...);
    - every call node has a traced value (no dangling, untraced node).
    """
    problems: list[str] = []
    module = graph.module
    for placeholder, fqn in graph.params.items():
        traced = tensor_shape(graph.node(placeholder).meta.get("val"))
        try:
            actual = tuple(module.get_parameter(fqn).shape)
        except AttributeError:
            problems.append(f"parameter '{fqn}' is in the graph but not in the module")
            continue
        if traced != actual:
            problems.append(f"parameter '{fqn}': graph shape {traced} != module shape {actual}")
    problems.extend(check_module_attributes(module))
    for node in graph.nodes():
        if node.op == "call_function" and "val" not in node.meta:
            problems.append(f"node '{node.name}' has no traced value")
    return problems


class PassManager:
    """Runs passes in order, checking contracts and graph invariants between them.

    Example:
        >>> pm = PassManager([AnalyzeDependencies(), ScoreChannels("l2"), PruneChannels(ratio=0.3)])
        >>> result = pm(graph)

    """

    def __init__(self, passes: Sequence[Pass], *, check_invariants: bool = True) -> None:
        """Create a manager over ``passes``; ``check_invariants`` lints the graph after each transform."""
        for p in passes:
            if not isinstance(p, Pass):
                raise PassContractError(f"{p!r} is not a secateurs pass")
        self.passes = list(passes)
        self.check_invariants = check_invariants

    def __call__(self, graph: Graph) -> PipelineResult:
        """Run every pass on ``graph`` and return the final graph and per-pass results.

        Raises:
            PassContractError: A pass lacked a required analysis or broke a graph invariant (the message
                names the pass).

        """
        results: list[tuple[str, PassResult, float]] = []
        for p in track(self.passes, "passes"):
            start = time.perf_counter()
            result = p(graph)
            elapsed = time.perf_counter() - start
            log.info("%s: modified=%s (%.2fs)", p.name, result.modified, elapsed)
            if result.modified and self.check_invariants:
                problems = graph_invariants(result.graph)
                if problems:
                    raise PassContractError(f"{p.name} broke graph invariants: " + "; ".join(problems[:5]))
            results.append((p.name, result, elapsed))
            graph = result.graph
        return PipelineResult(graph, results)
