"""The one-call entry point: ``secateurs.prune``."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from secateurs.backends.latency import LatencyTable
from secateurs.errors import BudgetError, did_you_mean
from secateurs.frontends.torch_export import ExampleInputs, capture
from secateurs.ir.cost import count_flops
from secateurs.ir.depgraph import FrozenGroup
from secateurs.passes.allocate import AllocateBudget
from secateurs.passes.base import Pass, PassManager
from secateurs.passes.channels import ChannelOptions, GroupChange, PruneChannels, PruneRecord
from secateurs.passes.criteria import criteria_names
from secateurs.passes.dependencies import AnalyzeDependencies, DependencyRecord
from secateurs.passes.depth import DEPTH_CRITERIA, DepthRecord, RemoveBlocks, RemoveSublayers
from secateurs.passes.distill import RecoverRecord
from secateurs.passes.drift import OutputDrift, measure_drift, snapshot_outputs
from secateurs.passes.experts import (
    EXPERT_CRITERIA,
    ExpertChange,
    PruneExpertNeurons,
    PruneExperts,
    ScoreExperts,
    find_moe_blocks,
)
from secateurs.passes.importance import CRITERIA, ChannelScores, ScoreChannels
from secateurs.passes.recover import ReconstructLayers
from secateurs.passes.sparsity import SPARSITY_CRITERIA, SparsifyWeights, SparsityRecord
from secateurs.report import LayerCost, costs_by_layer, layer_costs, layer_identities, layer_of, layer_renames

__all__ = ["WEIGHT_DEFAULT", "Report", "change_lines", "check_read", "sparsity_lines", "frozen_lines", "plan_passes", "prune", "run_passes"]


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
        lines += frozen_lines(self.frozen, self.unsupported_ops)
        return "\n".join(lines)


def sparsity_lines(record: SparsityRecord, limit: int = 10) -> list[str]:
    """Report lines for a sparsity step: how many layers of how many, and every layer left dense with why."""
    done, left = record.layers, record.skipped
    mean = sum(v for _, v in done) / max(len(done), 1)
    lines = [f"weight sparsity {record.pattern} by {record.criterion}: {len(done)} of {len(done) + len(left)} "
             f"layers, mean {mean:.1%} zeros"]
    if left:
        lines.append(f"  left dense ({len(left)}):")
        by_reason: dict[str, list[str]] = {}
        for name, why in left:
            by_reason.setdefault(why, []).append(name)
        for why, names in list(by_reason.items())[:limit]:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            lines.append(f"    {', '.join(names[:3])}{more}: {why}")
    return lines


def change_lines(changes: Sequence[GroupChange], limit: int = 20) -> list[str]:
    """Report lines for pruned groups (the first ``limit``)."""
    lines = [f"  {c.name}: {c.before} -> {c.after}" for c in changes[:limit]]
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
    heads: float | None = None,
    kv_groups: float | None = None,
    ffn: float | None = None,
    channels: float | None = None,
    layers: float | None = None,
    sublayers: float | None = None,
    depth_criterion: str | None = None,
    experts: float | None = None,
    expert_neurons: float | None = None,
    expert_importance: str | None = None,
    importance: str | Callable[..., Any] | None = None,
    scope: str | None = None,
    target: str | None = None,
    min_keep: float | None = None,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    hidden: bool | float = False,
    calib: Iterable[Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    bias_compensation: bool | None = None,
    sparsity: float | None = None,
    nm: tuple[int, int] | str | None = None,
    sparsity_criterion: str | None = None,
    sequential: bool = False,
    reconstruct: bool = False,
    owl: bool = False,
    sparsity_allocate: str | None = None,
    allocate: str | None = None,
    budget_unit: str | None = None,
    speedup: float | None = None,
    latency_cache: str | None = None,
    latency_backend: str | None = None,
    verify: bool = True,
) -> tuple[list[Pass], LatencyTable | None, bool]:
    """The passes :func:`prune` runs for these options (recipes' ``prune`` step expands to the same list).

    Args:
        model: The model (a dense copy is kept for ``reconstruct``; may be None otherwise).
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
        sparsity_criterion: ``"magnitude"`` (default), ``"wanda"``, ``"sparsegpt"`` (these two use ``calib``) or
            ``"global_magnitude"``.
        sequential: Calibrate sparsity block by block on the pruned blocks' outputs (LLM style; bounded memory).
        owl: Outlier-weighted layer-wise sparsity (OWL) for unstructured ``sparsity``: layers with more Wanda
            outliers are pruned less, the total stays ``sparsity``.
        sparsity_allocate: Spread unstructured ``sparsity`` over the layers: ``"global"``, ``"lamp"``, ``"owl"``
            or ``"dp"`` (each layer capped at 95%).
        reconstruct: After sparsity, refit kept weights by least squares against the dense model, shift biases
            and re-estimate BatchNorm statistics on ``calib`` (keeps a dense copy while pruning).
        allocate: Spread the budget over the groups with a budget allocator: ``"global"``, ``"lamp"``, ``"owl"``,
            ``"dp"``, ``"ecoflap"`` or ``"cfsp"`` (see :mod:`secateurs.passes.allocate`); sizes then differ. The
            budget is each per-structure ratio (``ffn``, ``heads``, ...) over that structure's groups when any is
            given, else ``ratio`` over all FFN, head and conv-channel groups together.
        budget_unit: What the allocator's ``ratio`` is a fraction of: ``"channels"``, ``"params"``, ``"flops"``
            or ``"latency"`` (measured on PyTorch CPU and cached in ``latency_cache``).
        speedup: A whole-model latency target (e.g. 1.5 for "1.5x faster"); implies ``budget_unit="latency"``
            and ``allocate="dp"`` unless an allocator is given. The report holds the measured latencies.
        latency_cache: Latency cache file (default ``~/.cache/secateurs/latency.json``).
        latency_backend: Where latency is measured: ``"torch"`` (PyTorch CPU) or ``"onnxruntime"``.
        verify: Re-capture and check every traced shape against the plan (recommended).

    Returns:
        The passes, the latency table they share (or None) and whether to measure whole-model latency.

    Raises:
        BudgetError: A value is invalid, or an option is read by no pass of the plan (a width criterion with
            only sparsity asked for, ``ignore`` naming no module, ...): the message names the option meant.

    """
    kinds = {"heads": heads, "kv_groups": kv_groups, "ffn": ffn, "channels": channels}
    kind_ratios = tuple((k, float(v)) for k, v in kinds.items() if v is not None)
    if not isinstance(hidden, bool):
        kind_ratios += (("hidden", float(hidden)),)
    if ratio is None:
        structural = (experts, expert_neurons, layers, sublayers, sparsity, nm)
        ratio = 0.0 if kind_ratios or any(v is not None for v in structural) else 0.3
    sparse = sparsity is not None or nm is not None
    width = ratio > 0 or any(v > 0 for _, v in kind_ratios)
    asked_other = bool(layers or sublayers or experts or expert_neurons or sparse)
    width_runs = width or not asked_other  # with nothing else asked, a ratio-0 width pass reports the groups
    _check_criteria(importance, sparsity_criterion, depth_criterion, expert_importance)
    given = {name: value for name, value in (
        ("importance", importance), ("scope", scope), ("target", target), ("min_keep", min_keep),
        ("round_to", round_to), ("loss_fn", loss_fn), ("bias_compensation", bias_compensation),
        ("allocate", allocate), ("budget_unit", budget_unit), ("speedup", speedup),
        ("latency_cache", latency_cache), ("latency_backend", latency_backend), ("sparsity_criterion", sparsity_criterion),
        ("sequential", sequential or None), ("owl", owl or None), ("sparsity_allocate", sparsity_allocate),
        ("reconstruct", reconstruct or None), ("depth_criterion", depth_criterion),
        ("expert_importance", expert_importance), ("hidden", hidden if hidden is True else None),
    ) if value is not None}
    check_read(given, width=width_runs, sparse=sparse, depth=bool(layers or sublayers), experts=bool(experts),
                ignore=tuple(ignore))
    if model is not None and not isinstance(model, nn.Identity):
        if ignore:
            _check_ignore(model, ignore)
        if (experts or expert_neurons) and not find_moe_blocks(model):
            raise BudgetError(f"{'experts=' if experts else 'expert_neurons='} (--experts) selects nothing: the model "
                              "has no mixture-of-experts block (a router beside a list or fused tensor of experts)")
    if importance is None:
        # the hidden size streams with weight criteria only: the same default in memory keeps the paths equal
        importance = "flap" if calib is not None and hidden is False else WEIGHT_DEFAULT
    if bias_compensation is None:
        bias_compensation = importance == "flap"
    elif bias_compensation and importance not in ("flap", "activation"):
        raise BudgetError(f"bias_compensation (--bias-compensation) folds calibration means into biases and needs "
                          f"importance 'flap' or 'activation' (--criterion), not {_name(importance)!r}")
    if loss_fn is not None and importance != "taylor":
        raise BudgetError(f"loss_fn is read only by importance='taylor'; importance is {_name(importance)!r}")
    if sequential and (sparsity_criterion or "magnitude") == "magnitude":
        raise BudgetError("sequential=True calibrates 'wanda' / 'sparsegpt' block by block; magnitude sparsity "
                          "needs no calibration (set sparsity_criterion)")
    if allocate is not None and (target is not None or scope is not None):
        raise BudgetError(f"{'target' if target is not None else 'scope'}= is for the uniform or global plan; "
                          "with allocate= the budget is set by budget_unit= (and the per-structure ratios)")
    if budget_unit is not None and allocate is None and speedup is None:
        raise BudgetError("budget_unit= is read by the budget allocator only: give allocate= too")
    if (latency_cache is not None or latency_backend is not None) and budget_unit != "latency" and speedup is None:
        raise BudgetError("latency_cache= / latency_backend= are read only with budget_unit='latency' or speedup=")
    options = ChannelOptions(
        ratio=ratio, target=target or "channels", scope=scope or "local",
        min_keep=0.1 if min_keep is None else min_keep, round_to=8 if round_to is None else round_to,
        ignore=tuple(ignore), hidden=hidden is True, kind_ratios=kind_ratios, bias_compensation=bias_compensation,
        verify=verify,
    )
    depth_criterion = depth_criterion or "bi"
    expert_importance = expert_importance or "frequency"
    sparsity_criterion = sparsity_criterion or "magnitude"
    budget_unit = budget_unit or "channels"
    latency_backend = latency_backend or "torch"
    min_keep = options.min_keep
    passes: list[Pass] = []
    table: LatencyTable | None = None
    if layers:
        passes.append(RemoveBlocks(layers, depth_criterion, calib=calib))
    if sublayers:
        passes.append(RemoveSublayers(sublayers, depth_criterion, calib=calib))
    if experts:
        passes += [ScoreExperts(expert_importance, calib=calib), PruneExperts(experts)]
    if expert_neurons:
        passes.append(PruneExpertNeurons(expert_neurons))
    if width_runs:
        passes += [AnalyzeDependencies(), ScoreChannels(importance, calib=calib, loss_fn=loss_fn)]
        if speedup is not None:
            allocate, budget_unit = allocate or "dp", "latency"
        if allocate is not None:
            table = LatencyTable(latency_backend, cache=latency_cache) if budget_unit == "latency" else None
            passes.append(AllocateBudget(ratio, allocate, unit=budget_unit, min_keep=min_keep, calib=calib,
                                         latency=table, speedup=speedup, kind_ratios=kind_ratios))
        passes.append(PruneChannels(options))
    if isinstance(nm, str):
        try:
            n_, m_ = (int(v) for v in nm.split(":"))
        except ValueError as exc:
            raise BudgetError(f"nm must look like '2:4', got {nm!r}") from exc
        nm = (n_, m_)
    if sparse:
        passes += [AnalyzeDependencies(), SparsifyWeights(sparsity or 0.0, nm=nm, criterion=sparsity_criterion,
                                                          calib=calib, sequential=sequential, owl=owl,
                                                          allocate=sparsity_allocate, ignore=tuple(ignore))]
        if reconstruct:
            if model is None:
                raise BudgetError("reconstruct=True needs the dense model")
            passes.append(ReconstructLayers(copy.deepcopy(model), calib=calib))
    return passes, table, speedup is not None


WEIGHT_DEFAULT = "l2"
"""The width criterion used when no calibration data is given (the best weight-only one measured, benchmarks/README.md)."""

# Which pass reads each option, and the command-line flag a user of the CLI would have typed.
_READERS = {
    "width": ("importance", "scope", "target", "min_keep", "round_to", "loss_fn", "bias_compensation", "allocate",
              "budget_unit", "speedup", "latency_cache", "latency_backend", "hidden"),
    "sparse": ("sparsity_criterion", "sequential", "owl", "sparsity_allocate", "reconstruct"),
    "depth": ("depth_criterion",),
    "experts": ("expert_importance",),
}
_FLAG = {"importance": "--criterion", "sparsity_criterion": "--sparsity-criterion",
         "depth_criterion": "--depth-criterion", "allocate": "--allocate", "scope": "--scope", "round_to": "--round-to",
         "bias_compensation": "--bias-compensation"}
_WHAT = {"width": "width pruning (ratio= or heads= / kv_groups= / ffn= / channels= / hidden=; --heads --ffn ...)",
         "sparse": "weight sparsity (sparsity= / nm=; --sparsity --nm)",
         "depth": "depth pruning (layers= / sublayers=; --layers --sublayers)",
         "experts": "expert pruning (experts=; --experts)"}
# A criterion name typed into the option of another pass, and the option that takes it.
_CRITERION_OPTIONS = {"importance": CRITERIA, "sparsity_criterion": SPARSITY_CRITERIA,
                      "depth_criterion": DEPTH_CRITERIA, "expert_importance": EXPERT_CRITERIA}


def _name(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", type(value).__name__)


def _spell(option: str, value: Any = None) -> str:
    """An option as both a Python keyword and a CLI flag: ``importance='sparsegpt' (--criterion sparsegpt)``."""
    py = option if value is None else f"{option}={value!r}"
    flag = _FLAG.get(option)
    return py if flag is None else f"{py} ({flag}{'' if value is None else ' ' + str(value)})"


def _check_criteria(*values: Any) -> None:
    """Refuse a criterion given to the wrong option, naming the option that takes it."""
    table = {**_CRITERION_OPTIONS, "importance": criteria_names()}  # criteria registered after import count too
    for option, value in zip(table, values, strict=True):
        if not isinstance(value, str) or value in table[option]:
            continue
        owners = [o for o, names in table.items() if value in names]
        if owners:
            raise BudgetError(f"{_spell(option, value)} is not a criterion of this option: {value!r} is a criterion "
                              f"of {owners[0]}; use {_spell(owners[0], value)}")
        raise BudgetError(f"unknown {_spell(option)} {value!r}{did_you_mean(value, table[option])}; choose from "
                          f"{', '.join(table[option])}")


def check_read(given: dict[str, Any], *, width: bool, sparse: bool, depth: bool = False, experts: bool = False,
               ignore: tuple[str, ...] = ()) -> None:
    """Refuse options that no pass of the plan reads (never run with less than what was asked).

    ``given`` holds the options the caller set (keyword names of :func:`plan_passes`); the flags say which steps
    run. The message names the option, its CLI flag, the step that would read it and, for a criterion valid for
    a step that does run, the option meant.

    Raises:
        BudgetError: An option is read by no step that runs.

    """
    runs = {"width": width, "sparse": sparse, "depth": depth, "experts": experts}
    for step, options in _READERS.items():
        if runs[step]:
            continue
        for option in options:
            if option not in given:
                continue
            value = given[option]
            message = (f"{_spell(option, value if isinstance(value, str) else None)} is read only by "
                       f"{_WHAT[step]}, which this call does not ask for")
            if isinstance(value, str):
                for other, names in _CRITERION_OPTIONS.items():
                    if other != option and value in names and runs[next(k for k, v in _READERS.items()
                                                                      if other in v)]:
                        message += f"; for the step that runs use {_spell(other, value)}"
            raise BudgetError(message)
    if ignore and not (width or sparse):
        raise BudgetError("ignore= is read by width pruning and weight sparsity only, and neither is asked for")


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
    dense_outputs = snapshot_outputs(model, graph.args, graph.kwargs) if check_outputs else None
    params_before = graph.param_count()
    flops_before = count_flops(graph)
    layers_before = costs_by_layer(graph)
    identities = layer_identities(model, layers_before)
    latency_before = latency.model_latency(graph) if latency is not None and measure_latency else None
    result = PassManager(passes)(graph)
    latency_after = None
    if latency is not None:
        latency.save()
        if latency_before is not None:
            latency_after = latency.model_latency(result.graph)
    drift = measure_drift(model, graph.args, graph.kwargs, dense_outputs) if dense_outputs is not None else None
    record: PruneRecord | None = result.record(PruneRecord)
    deps: DependencyRecord | None = result.record(DependencyRecord)
    depth = [r.record for name, r, _ in result.results if isinstance(r.record, DepthRecord) and r.modified]
    expert_changes = [c for name, r, _ in result.results if name in ("PruneExperts", "PruneExpertNeurons")
                      for c in (r.record or [])]
    return Report(
        params_before=params_before,
        params_after=result.graph.param_count(),
        flops_before=flops_before,
        flops_after=count_flops(result.graph),
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
        layers=layer_costs(layers_before, costs_by_layer(result.graph, identities)),
        passes=[(name, elapsed) for name, _, elapsed in result.results],
        drift=drift,
        recovery=result.record(RecoverRecord),
        width_criterion=scores.criterion if (scores := result.record(ChannelScores)) is not None else None,
    )
