"""Pass protocol and the pass manager.

The manager runs every transform inside one transaction: a :class:`~secateurs.modeling.rewrite.Snapshot` that
the pass records its changes in (:func:`transaction`), kept until the pass and its checks (its ``ensures``, the
graph invariants) have passed. If anything fails, or the run is interrupted, the manager rolls a
``transactional`` pass back and checks that the module is as it was (the same tensors, shapes, dtypes, modules and
size attributes) before the error goes on.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import nn

from secateurs.errors import PassContractError
from secateurs.ir.graph import Graph, tensor_shape
from secateurs.modeling.rewrite import Snapshot, check_module_attributes
from secateurs.progress import track

__all__ = ["Pass", "PassManager", "PassResult", "PipelineResult", "graph_invariants", "module_fingerprint",
           "transaction"]

_ACTIVE: contextvars.ContextVar[Snapshot | None] = contextvars.ContextVar("secateurs_transaction", default=None)

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


def transaction() -> Snapshot:
    """The snapshot a transform records its changes in.

    Under a :class:`PassManager` it is the manager's, one per pass, rolled back by the manager if the pass or
    its checks fail; a pass called on its own gets a new one (and rolls back itself, as every built-in one does).
    """
    snap = _ACTIVE.get()
    return snap if snap is not None else Snapshot()


def module_fingerprint(module: nn.Module) -> tuple[Any, ...]:
    """What a rollback must restore.

    Every submodule (name, type), tensor (name, identity, shape, dtype) and size attribute problem. Cheap (no
    tensor data is read); in-place edits of a tensor's values are not seen, so a transactional pass replaces
    tensors rather than editing them.
    """
    mods = tuple((n, type(m).__name__) for n, m in module.named_modules())
    tensors = tuple((n, id(t), tuple(t.shape), t.dtype) for n, t in
                    [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    return mods, tensors, tuple(check_module_attributes(module))


Ensure = Callable[[Graph, "PassResult"], list[str]]


class Pass:
    """Base class of every pass.

    Subclasses set ``requires`` (analysis result types that must be present), ``provides`` (the types
    they add) and ``transforms`` (True when they rewrite the model, which drops every analysis), and
    implement :meth:`run`. A transform may also set ``ensures`` (checks ``(graph before, result) -> problems``
    the manager runs after it) and ``transactional`` (it records every change in :func:`transaction`, so the
    manager can roll it back exactly).
    """

    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = ()
    transforms: ClassVar[bool] = False
    ensures: ClassVar[tuple[Ensure, ...]] = ()
    transactional: ClassVar[bool] = False

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
            result = self._run(p, graph) if p.transforms else p(graph)
            elapsed = time.perf_counter() - start
            log.info("%s: modified=%s (%.2fs)", p.name, result.modified, elapsed)
            results.append((p.name, result, elapsed))
            graph = result.graph
        return PipelineResult(graph, results)

    def _check(self, p: Pass, graph: Graph, result: PassResult) -> None:
        """Refuse a transform whose ``ensures`` or the graph invariants fail (the message names the pass)."""
        problems = [f"{check.__name__}: {m}" for check in p.ensures for m in check(graph, result)]
        if problems:
            raise PassContractError(f"{p.name} did not ensure what it promises: " + "; ".join(problems[:5]))
        problems = graph_invariants(result.graph) if self.check_invariants else []
        if problems:
            raise PassContractError(f"{p.name} broke graph invariants: " + "; ".join(problems[:5]))

    def _run(self, p: Pass, graph: Graph) -> PassResult:
        """Run the transform ``p`` in a transaction: checked after, rolled back on any failure."""
        snap = Snapshot()
        before = module_fingerprint(graph.module) if p.transactional else None
        token = _ACTIVE.set(snap)
        try:
            result = p(graph)
            if result.modified:
                self._check(p, graph, result)
            return result
        except BaseException as exc:
            if p.transactional:
                snap.restore()
                if module_fingerprint(graph.module) != before:
                    raise PassContractError(f"{p.name} failed ({type(exc).__name__}: {exc}) and rolling it back did "
                                            "not restore the model: a change was not recorded in its "
                                            "transaction") from exc
            raise
        finally:
            _ACTIVE.reset(token)
