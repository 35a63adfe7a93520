"""The one-call entry point: ``secateurs.prune``."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import ExampleInputs, capture
from secateurs.ir.depgraph import FrozenGroup
from secateurs.modeling.latency import LatencyTable
from secateurs.passes.allocate import AllocateBudget, LayerBudget
from secateurs.passes.base import Pass, PassManager
from secateurs.passes.channels import ChannelOptions, GroupChange, PruneChannels, PruneRecord
from secateurs.passes.dependencies import AnalyzeDependencies, DependencyRecord
from secateurs.passes.depth import DepthRecord, RemoveBlocks, RemoveSublayers
from secateurs.passes.distill import RecoverRecord
from secateurs.passes.drift import OutputDrift, measure_drift, snapshot_outputs
from secateurs.passes.experts import (
    ExpertChange,
    PruneExpertNeurons,
    PruneExperts,
    ScoreExperts,
    find_moe_blocks,
)
from secateurs.passes.importance import ChannelScores, ScoreChannels
from secateurs.passes.recover import ReconstructLayers
from secateurs.passes.sparsity import SparsifyWeights, SparsityRecord
from secateurs.passes.tyr import TyrSearch
from secateurs.passes.unipruning import UniSearch
from secateurs.report import LayerCost, costs_by_layer, layer_costs, layer_identities, layer_of, layer_renames
from secateurs.spec import WEIGHT_DEFAULT, PruneSpec

__all__ = ["WEIGHT_DEFAULT", "Report", "budget_pass", "change_lines", "frozen_lines", "passes_for", "plan_passes", "prune", "run_passes",
           "sparsity_lines"]


@dataclasses.dataclass
class Report:
    """What :func:`prune` did.

    Attributes:
        params_before: Parameters before pruning.
        params_after: Parameters after pruning (measured on the rewritten module).
        flops_before: FLOPs of one call on the example inputs before (multiply-add = 2).
        flops_after: The same after (measured on a fresh capture of the rewritten module).
        frozen: Channel groups left alone, each with the reason.
        changes: Every pruned group with its size before and after.
        unsupported_ops: Graph nodes whose op has no rule (their channels are frozen).
        retries: How many times a plan was redone because the model's code contradicted it.
        compensated_biases: Consumer biases that absorbed removed channels' means (``bias_compensation``).
        sparsity: Per-layer weight sparsity when ``sparsity`` / ``nm`` was asked for.
        latency_before: Measured seconds per forward on the example inputs before (with ``speedup``).
        latency_after: The same after pruning.
        depth: One record per depth pass: removed blocks / sublayers with their scores.
        experts: Per MoE block, experts (``PruneExperts``) or per-expert neurons (``PruneExpertNeurons``) before
            and after.
        layers: Parameters and FLOPs of every layer before and after.
        drift: How far the outputs moved on the example inputs (``check_outputs``), or None.
        recovery: The :class:`~secateurs.passes.distill.RecoverRecord` of a recovery run (loss curve), or None.
        passes: The passes that ran, in order, with seconds each.
        width_criterion: The criterion that scored the width groups (``"flap"``, ``"l2"``, ...), or None.
        capture: How the model was captured: ``"record"`` (one recorded forward) or ``"export"``
            (``torch.export``, where recording refused the model).
        verification: Which check verified the width rewrite (``verify=``), or ``""`` without one.
        allocation: What a search allocator of the width budget did (``allocate="tyr"``), or None.

    """

    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    frozen: list[FrozenGroup]
    changes: list[GroupChange]
    unsupported_ops: list[str]
    retries: int = 0
    compensated_biases: int = 0
    experts: list[ExpertChange] = dataclasses.field(default_factory=list)
    depth: list[DepthRecord] = dataclasses.field(default_factory=list)
    latency_before: float | None = None
    latency_after: float | None = None
    sparsity: SparsityRecord | None = None
    layers: list[LayerCost] = dataclasses.field(default_factory=list)
    passes: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    drift: OutputDrift | None = None
    recovery: Any = None
    width_criterion: str | None = None
    capture: str = ""
    verification: str = ""
    allocation: TyrSearch | None = None

    @property
    def param_ratio(self) -> float:
        """Fraction of parameters removed."""
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_ratio(self) -> float:
        """Fraction of FLOPs removed."""
        return 1 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def __str__(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"params {self.params_before:,} -> {self.params_after:,} (-{100 * self.param_ratio:.1f}%)",
            f"FLOPs  {self.flops_before:,.0f} -> {self.flops_after:,.0f} (-{100 * self.flop_ratio:.1f}%)",
            f"pruned groups: {len(self.changes)}",
        ]
        if self.changes and self.width_criterion:
            lines[-1] += (f" (by {self.width_criterion}"
                          + (f", {self.compensated_biases} biases compensated" if self.compensated_biases else "")
                          + ")")
        if self.latency_before and self.latency_after:
            lines.insert(2, f"latency {1e3 * self.latency_before:.2f} ms -> {1e3 * self.latency_after:.2f} ms "
                            f"({self.latency_before / self.latency_after:.2f}x, PyTorch CPU)")
        lines += change_lines(self.changes)
        if self.allocation is not None:
            lines.append(tyr_line(self.allocation))
        if self.sparsity is not None:
            lines += sparsity_lines(self.sparsity)
        for d in self.depth:
            lines.append(f"removed by '{d.criterion}': " + ", ".join(f"{n} ({v:.4f})" for n, v in d.removed))
        for e in self.experts:
            lines.append(f"  {e.block}: {e.before} -> {e.after} ({e.what})")
        if self.recovery is not None:
            r = self.recovery
            last = r.evaluations[-1] if r.evaluations else None
            lines.append(f"recovery ({r.mode}, {r.objective}): {r.steps} steps in {r.seconds:.0f}s"
                         + (f", held-out loss {last.eval_loss:.4f}" if last is not None and last.eval_loss else ""))
        if self.drift is not None:
            lines.append(str(self.drift))
        if self.verification:
            lines.append(f"verified ({self.verification})")
        lines += frozen_lines(self.frozen, self.unsupported_ops)
        return "\n".join(lines)


def sparsity_lines(record: SparsityRecord, limit: int = 10) -> list[str]:
    """Report lines for a sparsity step: how many layers of how many, and every layer left dense with why."""
    done, left = record.layers, record.skipped
    mean = sum(v for _, v in done) / max(len(done), 1)
    lines = [f"weight sparsity {record.pattern} by {record.criterion}: {len(done)} of {len(done) + len(left)} "
             f"layers, mean {mean:.1%} zeros"]
    if record.search is not None:
        lines.append("  " + search_line(record.search))
    if left:
        lines.append(f"  left dense ({len(left)}):")
        by_reason: dict[str, list[str]] = {}
        for name, why in left:
            by_reason.setdefault(why, []).append(name)
        for why, names in list(by_reason.items())[:limit]:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            lines.append(f"    {', '.join(names[:3])}{more}: {why}")
    return lines


def tyr_line(search: TyrSearch) -> str:
    """One line of a Týr allocation search: rounds, evaluations, time, and the losses it estimated and measured."""
    ratios = [v for _, v in search.choices]
    spread = f"group ratios {min(ratios):.1%} to {max(ratios):.1%}" if ratios else "no group"
    return (f"tyr allocation search: {len(search.rounds)} rounds, {search.evaluations} evaluations in "
            f"{search.seconds:.1f} s; loss against the dense outputs {search.uniform_loss:.4g} uniform -> "
            f"{search.measured_loss:.4g} measured ({search.estimated_loss:.4g} estimated); {spread}")


def search_line(search: UniSearch) -> str:
    """One line of a UniPruning search: its steps and time, the losses, the spread of the layer sparsities."""
    ratios = [v for _, v in search.layer_ratios]
    spread = f"layer sparsity {min(ratios):.1%} to {max(ratios):.1%}" if ratios else "no layer"
    return (f"unipruning search: {search.steps} steps in {search.seconds:.2f} s; loss against the dense outputs "
            f"{search.anchor_loss:.4g} with the anchor alone -> {search.measured_loss:.4g} measured "
            f"({search.estimated_loss:.4g} estimated); {spread}")


def change_lines(changes: Sequence[GroupChange], limit: int = 20) -> list[str]:
    """Report lines for pruned groups (the first ``limit``)."""
    lines = [f"  {c.name}: {c.before} -> {c.after}{f' (set by {c.bound})' if c.bound else ''}"
             for c in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"  ... {len(changes) - limit} more")
    return lines


def frozen_lines(frozen: Sequence[FrozenGroup], unsupported_ops: Sequence[str]) -> list[str]:
    """Report lines for frozen groups, one per reason, and the ops without a rule."""
    lines = [f"frozen groups: {len(frozen)}"]
    for reason, items in _by_reason(frozen).items():
        example = items[0]
        more = f" and {len(items) - 1} like it" if len(items) > 1 else ""
        lines.append(f"  {reason}: {', '.join(example.members[:3])}"
                     f"{' ...' if len(example.members) > 3 else ''} x{example.size}{more}")
    if unsupported_ops:
        lines.append("unsupported ops (channels frozen): " + ", ".join(unsupported_ops[:10]))
    return lines


def _original_names(model: nn.Module, identities: dict[int, str], changes: list[GroupChange]) -> list[GroupChange]:
    """Changes named by the layers' names before any block removal renumbered them."""
    renames = layer_renames(model, identities, {layer_of(c.name.split("[")[0]) for c in changes})
    out = []
    for c in changes:
        layer = layer_of(c.name.split("[")[0])
        name = renames[layer] + c.name[len(layer):] if layer in renames else c.name
        out.append(dataclasses.replace(c, name=name))
    return out


def _by_reason(frozen: Sequence[FrozenGroup]) -> dict[str, list[FrozenGroup]]:
    """Frozen groups keyed by reason, with per-layer node suffixes (``sdpa_3``) folded together."""
    out: dict[str, list[FrozenGroup]] = {}
    for f in frozen:
        out.setdefault(re.sub(r"_\d+'", "'", f.reason), []).append(f)
    return out


def prune(model: nn.Module, example_inputs: ExampleInputs, ratio: float | None = None, **options: Any) -> Report:
    """Prune ``model`` in place and return a :class:`Report`.

    Args:
        model: Any ``nn.Module``; it is rewritten in place (smaller tensors, updated attributes).
        example_inputs: A tuple of positional tensors or a dict of keyword tensors (Hugging Face style).
        ratio: Fraction to remove (see :func:`plan_passes`).
        **options: The options of :func:`plan_passes`: ``heads``, ``kv_groups``, ``ffn``, ``channels``,
            ``layers``, ``sublayers``, ``experts``, ``sparsity``, ``nm``, ``importance``, ``calib``, ...; and
            ``check_outputs`` (default True): run the pruned model on the example inputs, refuse changed output
            shapes and report the output drift (see :func:`run_passes`).

    Returns:
        The report: parameters and FLOPs before and after, pruned and frozen groups.

    Raises:
        BudgetError: An option is unknown or its value is invalid.

    """
    check_outputs = bool(options.pop("check_outputs", True))
    try:
        passes, table, measure = plan_passes(model, ratio, **options)
    except TypeError as exc:
        raise BudgetError(f"prune(): {exc}") from exc
    return run_passes(model, example_inputs, passes, latency=table, measure_latency=measure,
                      check_outputs=check_outputs)


def plan_passes(
    model: nn.Module | None,
    ratio: float | None = None,
    *,
    calib: Iterable[Any] | None = None,
    **options: Any,
) -> tuple[list[Pass], LatencyTable | None, bool]:
    """The passes :func:`prune` runs for these options (recipes' ``prune`` step expands to the same list).

    The options are those of :class:`~secateurs.spec.PruneSpec`, the schema every path shares; each is
    checked there (names, values, and whether a step of the plan reads it).

    Args:
        model: The model (a dense copy is kept for ``reconstruct``; may be None otherwise).
        **options: The :class:`~secateurs.spec.PruneSpec` options, each described here.
        ratio: Fraction to remove, in [0, 1) (see ``target``). Defaults to 0.3 when no per-structure ratio
            is given, else to 0 (only the named structures are pruned).
        heads: Fraction of attention heads to remove (query heads within each KV group under GQA).
        kv_groups: Fraction of KV groups (a KV head with all its query heads) to remove.
        ffn: Fraction of MLP / GLU neurons (channels between two linear layers) to remove.
        channels: Fraction of other channels (convolutions) to remove.
        layers: Whole residual blocks to remove: a count >= 1 or a fraction of the blocks (done first, then
            width pruning of what remains).
        sublayers: Attention / MLP sublayers to replace by zeros (FinerCut): a count or a fraction.
        depth_criterion: ``"bi"`` (block influence, the default), ``"angular"`` (n consecutive blocks) or
            ``"greedy"``.
        experts: Fraction of the experts of every mixture-of-experts block to remove (router rows too).
        expert_neurons: Fraction of the FFN neurons inside every expert to remove.
        expert_importance: ``"frequency"`` (default), ``"mass"`` or ``"output_norm"`` of routing on ``calib``
            (defaults to the example).
        importance: Width criterion: ``"l1"``, ``"l2"``, ``"maw"``, ``"taylor"``, ``"activation"``, ``"flap"`` or
            a callable ``(graph, info, group) -> scores``. Default: ``"flap"`` when ``calib`` is given (the best
            measured criterion, see benchmarks/README.md) and the hidden size is not pruned, else the best weight-only one
            (:data:`WEIGHT_DEFAULT`).
        scope: ``"local"`` (same fraction per group, the default) or ``"global"`` (one normalised ranking).
        target: What ``ratio`` is a fraction of: ``"channels"`` (default), ``"params"`` or ``"flops"``.
        min_keep: Per-group floor as a fraction of its channels (default 0.1).
        round_to: Keep every sliced dim a multiple of this (default 8; 1 disables).
        uniform: Keep every layer's sizes alike (an allocator's per-layer ratios are equalised per structure), so
            the result loads with plain ``from_pretrained`` and every engine (``--uniform``).
        tensor_parallel: Keep every pruned layer shardable over this many tensor-parallel ranks, as serving
            engines shard it (``--tp``): query heads and FFN width multiples of it, KV groups a multiple or a
            divisor of it; planned under the constraint, with every allocator. Default 1 (no constraint).
        ignore: Module names (or prefixes ending in ``.``) whose groups and weights are left alone (width and
            sparsity); each must name a module of ``model``.
        hidden: Also prune channels that enter a cross-channel normalisation (a transformer's hidden size):
            ``True`` uses ``ratio``, a float is its own ratio.
        calib: Calibration batches for ``taylor`` / ``activation`` (defaults to ``example_inputs``).
        loss_fn: Loss on the model output for ``taylor``.
        bias_compensation: Fold removed inputs' calibration means into consumer biases (FLAP; consumers
            without a bias are left as they are); needs ``importance="flap"`` or ``"activation"``. Default: on
            with ``flap``, off otherwise.
        sparsity: Unstructured weight sparsity per linear / conv layer, after any structural pruning.
        nm: N:M weight sparsity, ``(2, 4)`` or ``"2:4"``, along input channels (TensorRT / cuSPARSELt layout).
        sparsity_criterion: ``"magnitude"`` (default; ``"wanda"`` with the ``unipruning`` allocator), ``"wanda"``,
            ``"sparsegpt"`` (these two use ``calib``) or ``"global_magnitude"``.
        sequential: Calibrate sparsity block by block on the pruned blocks' outputs (LLM style; bounded memory).
        owl: Outlier-weighted layer-wise sparsity (OWL) for unstructured ``sparsity``: layers with more Wanda
            outliers are pruned less, the total stays ``sparsity``.
        sparsity_allocate: Spread unstructured ``sparsity`` over the layers: ``"global"``, ``"lamp"``, ``"owl"``
            or ``"dp"`` (each layer capped at 95%), or ``"unipruning"`` (unstructured or ``nm``): the
            ``sparsity_criterion``'s saliency (``wanda`` or ``magnitude``) anchors 16 feedback steps on ``calib``
            against the dense model's outputs, and a mirror-descent controller spreads the budget (each layer
            within ``sparsity +- 0.1``); no weight changes (:mod:`secateurs.passes.unipruning`).
        reconstruct: After sparsity, refit kept weights by least squares against the dense model, shift biases
            and re-estimate BatchNorm statistics on ``calib`` (keeps a dense copy while pruning).
        allocate: Spread the budget over the groups with a budget allocator: ``"global"``, ``"lamp"``, ``"owl"``,
            ``"dp"``, ``"ecoflap"`` or ``"cfsp"`` (see :mod:`secateurs.passes.allocate`); sizes then differ. The
            budget is each per-structure ratio (``ffn``, ``heads``, ...) over that structure's groups when any is
            given, else ``ratio`` over all FFN, head and conv-channel groups together. ``"unipruning"`` allocates
            the weight sparsity (``sparsity`` / ``nm``) instead, as ``sparsity_allocate`` does.
        budget_unit: What the allocator's ``ratio`` is a fraction of: ``"channels"``, ``"params"``, ``"flops"``
            or ``"latency"`` (measured on PyTorch CPU and cached in ``latency_cache``).
        speedup: A whole-model latency target (e.g. 1.5 for "1.5x faster"); implies ``budget_unit="latency"``
            and ``allocate="dp"`` unless an allocator is given. The report holds the measured latencies.
        latency_cache: Latency cache file (default ``~/.cache/secateurs/latency.json``).
        latency_backend: Where latency is measured: ``"torch"`` (PyTorch CPU) or ``"onnxruntime"``.
        verify: How each width rewrite is checked against the plan: ``"fast"`` (default, True): one forward of the
            pruned model replayed against the dense recording, every traced shape against the plan and the
            outputs against the masked dense model (node by node on any doubt); ``"full"``: a ``torch.export``
            capture, every shape and every value node by node (slower; proves the result still exports);
            ``"off"`` (False).

    Returns:
        The passes, the latency table they share (or None) and whether to measure whole-model latency.

    Raises:
        BudgetError: A value is invalid, or an option is read by no pass of the plan (a width criterion with
            only sparsity asked for, ``ignore`` naming no module, ...): the message names the option meant.

    """
    spec = PruneSpec.parse({"ratio": ratio, **options}, where="prune()")
    return passes_for(model, spec, calib=calib)


def budget_pass(spec: PruneSpec, min_keep: float, *, calib: Iterable[Any] | None = None,
                backend: str = "torch") -> tuple[AllocateBudget | None, LatencyTable | None]:
    """The allocator pass ``spec`` asks for (``allocate=``, ``speedup=``), with the latency table it reads.

    Both drivers of a width step build it here: in memory and for an ONNX file (``backend`` is where latency is
    measured by default: PyTorch for a module, ONNX Runtime for a file).
    """
    allocate, unit = spec.width_allocator, spec.budget_unit or "channels"
    if spec.speedup is not None:
        allocate, unit = allocate or "dp", "latency"
    if allocate is None:
        return None, None
    table = LatencyTable(spec.latency_backend or backend, cache=spec.latency_cache) if unit == "latency" else None
    return AllocateBudget(spec.default_ratio, allocate, unit=unit, min_keep=min_keep, calib=calib, latency=table,
                          speedup=spec.speedup, kind_ratios=spec.kind_ratios,
                          bias_compensation=spec.bias_compensation), table


def passes_for(model: nn.Module | None, spec: PruneSpec, *, calib: Iterable[Any] | None = None,
               ) -> tuple[list[Pass], LatencyTable | None, bool]:
    """The passes of :func:`plan_passes` for a checked ``spec`` (the defaults are filled here)."""
    ignore = spec.ignore or ()
    if model is not None and not isinstance(model, nn.Identity):
        if ignore:
            _check_ignore(model, ignore)
        if (spec.experts or spec.expert_neurons) and not find_moe_blocks(model):
            raise BudgetError(f"{'experts=' if spec.experts else 'expert_neurons='} (--experts) selects nothing: the "
                              "model has no mixture-of-experts block (a router beside a list or fused tensor of experts)")
    width_runs = spec.width_runs()
    leave: tuple[tuple[str, str], ...] = ()
    if spec.expert_neurons and model is not None:  # ffn= then prunes the dense MLPs; the experts are pruned per expert
        leave = tuple((b.experts, "expert neurons are pruned per expert by expert_neurons=")
                      for b in find_moe_blocks(model))
    spec = spec.resolved(calibrated=calib is not None)
    ratio, importance = spec.default_ratio, spec.importance
    options = ChannelOptions(
        ratio=ratio, target=spec.target or "channels", scope=spec.scope or "local",
        min_keep=0.1 if spec.min_keep is None else spec.min_keep, round_to=8 if spec.round_to is None else spec.round_to,
        ignore=tuple(ignore), leave=leave, hidden=spec.hidden is True, kind_ratios=spec.kind_ratios,
        bias_compensation=bool(spec.bias_compensation), verify=True if spec.verify is None else spec.verify,
        tensor_parallel=spec.tensor_parallel or 1, uniform=bool(spec.uniform),
    )
    passes: list[Pass] = []
    table: LatencyTable | None = None
    if spec.layers:
        passes.append(RemoveBlocks(spec.layers, spec.depth_criterion or "bi", calib=calib))
    if spec.sublayers:
        passes.append(RemoveSublayers(spec.sublayers, spec.depth_criterion or "bi", calib=calib))
    if spec.experts:
        passes += [ScoreExperts(spec.expert_importance or "frequency", calib=calib), PruneExperts(spec.experts)]
    if spec.expert_neurons:
        passes.append(PruneExpertNeurons(spec.expert_neurons))
    if width_runs:
        passes += [AnalyzeDependencies(), ScoreChannels(importance, calib=calib, loss_fn=spec.loss_fn)]
        budget, table = budget_pass(spec, options.min_keep, calib=calib)
        passes += [budget] if budget is not None else []
        passes.append(PruneChannels(options))
    if spec.sparse:
        passes += [AnalyzeDependencies(), SparsifyWeights(spec.sparsity or 0.0, nm=spec.pattern,
                                                          criterion=spec.sparse_criterion,
                                                          calib=calib, sequential=bool(spec.sequential),
                                                          owl=bool(spec.owl), allocate=spec.sparsity_allocator,
                                                          ignore=tuple(ignore))]
        if spec.reconstruct:
            if model is None:
                raise BudgetError("reconstruct=True needs the dense model")
            passes.append(ReconstructLayers(copy.deepcopy(model), calib=calib))
    return passes, table, spec.speedup is not None


def _check_ignore(model: nn.Module, ignore: Sequence[str]) -> None:
    """Every ``ignore`` entry must name a module (or a prefix ending in ``.``) of ``model``."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in ignore:
        if not any(n == pattern or (pattern.endswith(".") and n.startswith(pattern)) or n.startswith(pattern + ".")
                   for n in names):
            close = difflib.get_close_matches(pattern, names, n=1)
            raise BudgetError(f"ignore entry {pattern!r} names no module of the model"
                              + (f"; did you mean {close[0]!r}?" if close else ""))


def run_passes(model: nn.Module, example_inputs: ExampleInputs, passes: Sequence[Pass], *,
               latency: LatencyTable | None = None, measure_latency: bool = False,
               check_outputs: bool = True) -> Report:
    """Capture ``model``, run ``passes`` through a :class:`PassManager` and report what they did.

    This is what :func:`prune` and recipes run. ``latency`` is the table latency-aware passes use (saved at
    the end); with ``measure_latency`` the whole model's latency before and after goes into the report. With
    ``check_outputs`` the pruned model is run on the example inputs at the end: its outputs must keep their
    shapes (else :class:`~secateurs.errors.VerificationError`) and their drift from the dense outputs is
    reported (``Report.drift``).
    """
    graph = capture(model, example_inputs)
    dense_outputs = None
    if check_outputs:  # a recorded capture ran the dense forward already: its outputs are the reference
        dense_outputs = ([t.clone() for t in graph.outputs] if graph.outputs is not None
                         else snapshot_outputs(model, graph.args, graph.kwargs))
    params_before = graph.param_count()
    layers_before = costs_by_layer(graph)
    flops_before = sum(flops for _, flops in layers_before.values())  # every op's FLOPs fall in one layer
    identities = layer_identities(model, layers_before)
    latency_before = latency.model_latency(graph) if latency is not None and measure_latency else None
    result = PassManager(passes)(graph)
    latency_after = None
    if latency is not None:
        latency.save()
        if latency_before is not None:
            latency_after = latency.model_latency(result.graph)
    # an eager forward of its own: the code path users run (fused fast paths skipped while capturing included)
    drift = measure_drift(model, graph.args, graph.kwargs, dense_outputs) if dense_outputs is not None else None
    layers_after = costs_by_layer(result.graph, identities)
    record: PruneRecord | None = result.record(PruneRecord)
    deps: DependencyRecord | None = result.record(DependencyRecord)
    depth = [r.record for name, r, _ in result.results if isinstance(r.record, DepthRecord) and r.modified]
    expert_changes = [c for name, r, _ in result.results if name in ("PruneExperts", "PruneExpertNeurons")
                      for c in (r.record or [])]
    return Report(
        params_before=params_before,
        params_after=result.graph.param_count(),
        flops_before=flops_before,
        flops_after=sum(flops for _, flops in layers_after.values()),
        frozen=record.frozen if record else [],
        changes=_original_names(model, identities, [c for _, r, _ in result.results if isinstance(r.record, PruneRecord)
                                                    for c in r.record.changes]),
        unsupported_ops=list(deps.unsupported_ops) if deps else [],
        retries=record.retries if record else 0,
        compensated_biases=record.compensated[0] if record else 0,
        experts=expert_changes,
        depth=depth,
        sparsity=result.record(SparsityRecord),
        latency_before=latency_before,
        latency_after=latency_after,
        layers=layer_costs(layers_before, layers_after),
        passes=[(name, elapsed) for name, _, elapsed in result.results],
        drift=drift,
        recovery=result.record(RecoverRecord),
        width_criterion=scores.criterion if (scores := result.record(ChannelScores)) is not None else None,
        capture=graph.capture,
        verification=record.check if record else "",
        allocation=budget.search if (budget := result.record(LayerBudget)) is not None else None,
    )
