"""Pass protocol and the pass manager, one for both IRs (a captured PyTorch :class:`Graph` and an ONNX graph).

The manager runs every transform inside one transaction, opened by the graph's :class:`Dialect`: for a PyTorch
graph a :class:`~secateurs.modeling.rewrite.Snapshot` that the pass records its changes in (:func:`transaction`),
for an ONNX graph a copy of the model's structure (tensors shared). It is kept until the pass and its checks
(its ``ensures``, the dialect's graph invariants) have passed. If anything fails, or the run is interrupted, the
manager rolls a ``transactional`` pass back and checks that the model is as it was before the error goes on: the
same tensors, shapes, dtypes, modules and size attributes, and no tensor edited in place that the transaction
did not copy first (torch's version counters tell). After a transform that modified the graph, every analysis
the pass does not itself provide is dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from secateurs.errors import PassContractError, VerificationError
from secateurs.frontends.derive import recapture
from secateurs.ir.aten_cost import aten_costs
from secateurs.ir.cost import CostModel
from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph, tensor_shape
from secateurs.modeling.rewrite import Snapshot, check_module_attributes
from secateurs.progress import track

__all__ = ["Dialect", "Pass", "PassManager", "PassResult", "PipelineResult", "Retry", "Transaction", "cost_model",
           "dialect_of", "graph_invariants", "module_fingerprint", "recorded", "register_dialect", "transaction"]

_ACTIVE: contextvars.ContextVar[Snapshot | None] = contextvars.ContextVar("secateurs_transaction", default=None)
_MANAGED: contextvars.ContextVar[bool] = contextvars.ContextVar("secateurs_managed", default=False)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult:
    """What one pass did.

    Attributes:
        graph: The graph after the pass (for a PyTorch transform, often a new capture of the changed model).
        modified: Whether the model changed.
        record: A typed record for the report (the pass's own dataclass), or None.

    """

    graph: Any
    modified: bool
    record: Any = None


@dataclasses.dataclass
class PipelineResult:
    """Result of a :class:`PassManager` run: the final graph and each pass's result, in order."""

    graph: Any
    results: list[tuple[str, PassResult, float]]

    @property
    def module(self) -> Any:
        """The (rewritten in place) module, or the ONNX model."""
        return self.graph.module if isinstance(self.graph, Graph) else getattr(self.graph, "model", None)

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


class Retry(Exception):  # noqa: N818 - a request to the manager, not an error the user sees
    """Raised by a transform whose rewrite the model contradicted, after it noted what to leave alone next time.

    The manager rolls the transaction back and runs the pass again (``pass.attempt`` counts the runs), up to
    the pass's ``max_retries``; then the last reason is raised as a :class:`~secateurs.errors.VerificationError`
    with the model restored. The analyses the pass read stay valid for its next run on a PyTorch graph (the
    rollback restores the module they describe); an ONNX rollback swaps in a copy of the model and drops them,
    so an ONNX pass does not ask for a retry.
    """


def transaction() -> Snapshot:
    """The snapshot a transform records its changes in.

    Under a :class:`PassManager` it is the manager's, one per pass, rolled back by the manager if the pass or
    its checks fail; a pass called on its own gets a new one (and rolls back itself, as every built-in one does).
    """
    snap = _ACTIVE.get()
    return snap if snap is not None else Snapshot()


@contextlib.contextmanager
def recorded() -> Iterator[Snapshot]:
    """The transaction for a pass's whole run (what a weight-editing pass records its edits in).

    Under a manager it is the manager's; outside one, the pass's own, rolled back if the pass fails and freed
    when it ends.
    """
    snap = _ACTIVE.get()
    if snap is not None:
        yield snap
        return
    own = Snapshot()
    try:
        yield own
    except BaseException:
        own.restore()
        raise
    own.discard()


def module_fingerprint(module: nn.Module) -> tuple[Any, ...]:
    """What a rollback must restore.

    Every submodule (name, type), tensor (name, identity, shape, dtype), hook count and size attribute problem.
    Cheap (no tensor data is read); in-place edits of a tensor's values are caught by :func:`_versions`.
    """
    mods = tuple((n, type(m).__name__, len(m._forward_pre_hooks), len(m._forward_hooks))
                 for n, m in module.named_modules())
    tensors = tuple((n, id(t), tuple(t.shape), t.dtype) for n, t in
                    [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    return mods, tensors, tuple(check_module_attributes(module))


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each parameter and buffer (by name) with its in-place version counter."""
    return {n: (t, _version(t)) for n, t in [*module.named_parameters(remove_duplicate=False),
                                             *module.named_buffers(remove_duplicate=False)]}


class Transaction(Protocol):
    """One transform's undo log, opened by :meth:`Dialect.begin`."""

    def commit(self) -> None:
        """Keep the change and free the undo log."""

    def rollback(self) -> list[str]:
        """Undo the change; returns what could not be restored (empty when the model is as it was)."""


class Dialect(Protocol):
    """What the pass manager needs from one IR: its graph invariants and a transaction over its model."""

    def invariants(self, graph: Any) -> list[str]:
        """Violations of the invariants every graph between passes satisfies."""

    def begin(self, graph: Any, transactional: bool) -> Transaction:
        """Open a transaction for one transform (``transactional``: the pass records its changes)."""

    def drop_analyses(self, graph: Any, keep: tuple[type, ...]) -> None:
        """Forget every analysis but ``keep`` after the model changed."""

    def cost_model(self, graph: Any, info: Any) -> CostModel:
        """The :class:`~secateurs.ir.cost.CostModel` of ``graph`` under its dependency analysis ``info``."""


_DIALECTS: dict[type, Dialect] = {}
_LAZY = {"OnnxGraph": "secateurs.passes.onnx_base"}  # dialects registered when their module is imported


def register_dialect(graph_type: type, dialect: Dialect) -> None:
    """Run passes over graphs of ``graph_type`` with ``dialect``."""
    _DIALECTS[graph_type] = dialect


def dialect_of(graph: Any) -> Dialect:
    """The dialect registered for ``graph``'s type.

    Raises:
        PassContractError: None is (the message names the type).

    """
    for cls in type(graph).__mro__:
        if cls in _DIALECTS:
            return _DIALECTS[cls]
    module = _LAZY.get(type(graph).__name__)
    if module is not None:
        importlib.import_module(module)
        return dialect_of(graph) if type(graph) in _DIALECTS else _missing(graph)
    return _missing(graph)


def cost_model(graph: Any, info: Any) -> CostModel:
    """The cost model of ``graph`` (either dialect) under its dependency analysis ``info``."""
    return dialect_of(graph).cost_model(graph, info)


def _missing(graph: Any) -> Dialect:
    raise PassContractError(f"passes run on a secateurs Graph or OnnxGraph, not {type(graph).__name__}")


class _TorchTransaction:
    """A :class:`Snapshot` the pass records in, with the module's fingerprint and version counters."""

    def __init__(self, graph: Graph, transactional: bool) -> None:
        self.module = graph.module
        self.snap = Snapshot()
        self.transactional = transactional
        self.before = module_fingerprint(self.module) if transactional else None
        self.versions = _versions(self.module) if transactional else {}
        self.token = _ACTIVE.set(self.snap)

    def commit(self) -> None:
        _ACTIVE.reset(self.token)
        self.snap.discard()

    def rollback(self) -> list[str]:
        _ACTIVE.reset(self.token)
        if not self.transactional:
            self.snap.discard()
            return []
        edited = set(self.snap.edited)
        self.snap.restore()
        problems = [] if module_fingerprint(self.module) == self.before else [
            "a replaced tensor, module or attribute was not recorded"]
        unrecorded = [n for n, (t, v) in self.versions.items() if _version(t) != v and id(t) not in edited]
        if unrecorded:
            problems.append(f"tensors edited in place without a copy: {', '.join(unrecorded[:5])}")
        return problems


class _TorchDialect:
    """The captured PyTorch graph."""

    def invariants(self, graph: Graph) -> list[str]:
        return graph_invariants(graph)

    def begin(self, graph: Graph, transactional: bool) -> Transaction:
        return _TorchTransaction(graph, transactional)

    def drop_analyses(self, graph: Graph, keep: tuple[type, ...]) -> None:
        for kind in [k for k in graph.analyses if k not in keep]:
            del graph.analyses[kind]

    def cost_model(self, graph: Graph, info: DependencyInfo) -> CostModel:
        return aten_costs(graph, info)


Ensure = Callable[[Any, "PassResult"], list[str]]


class Pass:
    """Base class of every pass.

    Subclasses set ``requires`` (analysis result types that must be present), ``provides`` (the types
    they add) and ``transforms`` (True when they rewrite the model, which drops every analysis), and
    implement :meth:`run`. A transform may also set ``ensures`` (checks ``(graph before, result) -> problems``
    the manager runs after it) and ``transactional`` (it records every change in :func:`transaction` /
    :func:`recorded`, so the manager can roll it back exactly; an ONNX transform is always rolled back, from a
    copy of the model's structure). The same class serves both IRs: an ONNX pass's ``run`` takes an
    ``OnnxGraph``.
    """

    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = ()
    transforms: ClassVar[bool] = False
    ensures: ClassVar[tuple[Ensure, ...]] = ()
    transactional: ClassVar[bool] = False
    max_retries: int = 0
    attempt: int = 0

    @property
    def name(self) -> str:
        """The pass's name (its class name)."""
        return type(self).__name__

    def run(self, graph: Any) -> PassResult:
        """Run on ``graph`` (a :class:`Graph`, or an ``OnnxGraph`` for ONNX passes)."""
        raise NotImplementedError

    def __call__(self, graph: Any) -> PassResult:
        """Run with the requires / provides contract checked.

        A transform called outside a :class:`PassManager` still runs in a transaction with its retries (its
        ``ensures`` and the graph invariants are the manager's checks).
        """
        if self.transforms and not _MANAGED.get():
            return PassManager([self], check_invariants=False, check_ensures=False)._run(dialect_of(graph), self, graph)
        return self._checked(graph)

    def _checked(self, graph: Any) -> PassResult:
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
    """Runs passes in order, checking contracts and graph invariants between them, each transform in a transaction.

    The same manager runs PyTorch passes over a :class:`Graph` and ONNX passes over an ``OnnxGraph``: the
    graph's :class:`Dialect` gives the invariants and the transaction.

    Example:
        >>> pm = PassManager([AnalyzeDependencies(), ScoreChannels("l2"), PruneChannels(ratio=0.3)])
        >>> result = pm(graph)

    """

    def __init__(self, passes: Sequence[Pass], *, check_invariants: bool = True, check_ensures: bool = True) -> None:
        """Create a manager over ``passes``.

        ``check_invariants`` lints the graph after each transform; ``check_ensures`` runs each transform's
        ``ensures``.
        """
        for p in passes:
            if not isinstance(p, Pass):
                raise PassContractError(f"{p!r} is not a secateurs pass")
        self.passes = list(passes)
        self.check_invariants = check_invariants
        self.check_ensures = check_ensures

    def __call__(self, graph: Any) -> PipelineResult:
        """Run every pass on ``graph`` and return the final graph and per-pass results.

        Raises:
            PassContractError: A pass lacked a required analysis or broke a graph invariant (the message
                names the pass), or the graph is of a type no dialect covers.

        """
        results: list[tuple[str, PassResult, float]] = []
        dialect = dialect_of(graph)
        for p in track(self.passes, "passes"):
            start = time.perf_counter()
            if isinstance(graph, Graph) and graph.derived:  # a faithful copy for the report, not for another pass
                graph = recapture(graph)
            result = self._run(dialect, p, graph) if p.transforms else p(graph)
            elapsed = time.perf_counter() - start
            log.info("%s: modified=%s (%.2fs)", p.name, result.modified, elapsed)
            results.append((p.name, result, elapsed))
            graph = result.graph
        return PipelineResult(graph, results)

    def _check(self, dialect: Dialect, p: Pass, graph: Any, result: PassResult) -> None:
        """Refuse a transform whose ``ensures`` or the graph invariants fail (the message names the pass)."""
        ensures = p.ensures if self.check_ensures else ()
        problems = [f"{check.__name__}: {m}" for check in ensures for m in check(graph, result)]
        if problems:
            raise PassContractError(f"{p.name} did not ensure what it promises: " + "; ".join(problems[:5]))
        problems = dialect.invariants(result.graph) if self.check_invariants else []
        if problems:
            raise PassContractError(f"{p.name} broke graph invariants: " + "; ".join(problems[:5]))

    def _run(self, dialect: Dialect, p: Pass, graph: Any) -> PassResult:
        """Run the transform ``p`` in a transaction: checked after, rolled back on any failure.

        While the pass asks for a :class:`Retry`, it runs again from the rolled-back model.
        """
        token = _MANAGED.set(True)
        try:
            for attempt in range(p.max_retries + 1):
                p.attempt = attempt
                tx = dialect.begin(graph, p.transactional)
                try:
                    result = p(graph)
                    if result.modified:
                        self._check(dialect, p, graph, result)
                except Retry as retry:
                    self._rolled_back(p, tx, retry)
                    if attempt == p.max_retries:
                        raise VerificationError(f"{p.name}: the rewritten model kept contradicting the plan after "
                                                f"{p.max_retries} retries ({retry}); the model was restored") from retry
                    log.info("%s: retrying after %s", p.name, retry)
                    continue
                except BaseException as exc:
                    self._rolled_back(p, tx, exc)
                    raise
                tx.commit()
                if result.modified:
                    dialect.drop_analyses(result.graph, p.provides)
                return result
            raise AssertionError("unreachable")  # the loop returns or raises
        finally:
            _MANAGED.reset(token)

    @staticmethod
    def _rolled_back(p: Pass, tx: Transaction, exc: BaseException) -> None:
        problems = tx.rollback()
        if problems:
            raise PassContractError(f"{p.name} failed ({type(exc).__name__}: {exc}) and rolling it back did "
                                    "not restore the model: a change was not recorded in its transaction ("
                                    + "; ".join(problems) + ")") from exc


register_dialect(Graph, _TorchDialect())
