"""Weight sparsity: unstructured and N:M (2:4) masks by magnitude, Wanda or SparseGPT.

Targets are the weights of linear and conv layers (and Hugging Face's Conv1D), except the real heads unless
asked: a layer that computes a graph output with no parametrised op after it (LM head, classifier, pooler) or
shares its weight with an input embedding. Every layer left dense is listed in the record with its reason. N:M groups run along the input
dimension, the layout TensorRT and cuSPARSELt accelerate: ``in_features`` of a linear (``[out, in]``), axis 1
of a conv weight, axis 0 of a Conv1D (``[in, out]``).

Criteria:
    ``magnitude``: smallest ``|w|`` (unstructured: per layer).
    ``wanda``: smallest ``|w| * ||x_j||`` compared within each output row (the input-channel norm over the
        calibration tokens).
    ``global_magnitude``: one ``|w|`` threshold across all targeted layers (unstructured), each layer capped at
        ``max_layer_sparsity`` (the floor that stops a layer collapsing, the Global-MP fix).
    ``sparsegpt``: OBS-style pruning with the inverse Hessian of the layer's calibration inputs
        (``H = X^T X``, dampened), in column blocks, updating the kept weights to compensate. For convs the
        Hessian is taken over input channels (every kernel tap of a channel shares it).

Masks stay with the model through ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``, so fine-tuning
keeps them) unless ``keep_masks=False``; :func:`remove_masks` makes them permanent and
:func:`check_nm` verifies a pattern.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from secateurs.distributed import all_reduce_sum, shard
from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph
from secateurs.modeling.outputs import remove_masks
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.base import Pass, PassResult, recorded
from secateurs.passes.criteria import step_criteria
from secateurs.passes.depth import find_blocks
from secateurs.passes.hooks import calibration_calls, first_tensor, run_calibration, select_layers
from secateurs.passes.sparse_masks import (
    _as_rows,
    _from_rows,
    _in_dim,
    _is_target,
    _nm_mask,
    _row_mask,
    _sparsegpt,
    _unstructured_mask,
    _weight,
    check_nm,
    sparsity_of,
)
from secateurs.passes.unipruning import UniSearch, search_masks
from secateurs.progress import track

log = logging.getLogger(__name__)

__all__ = ["SPARSITY_ALLOCATORS", "SPARSITY_CRITERIA", "SparsifyWeights", "SparsityRecord", "check_nm",
           "remove_masks", "sparsity_of"]

SPARSITY_CRITERIA = step_criteria("sparsity")  # registered in secateurs.passes.criteria
SPARSITY_ALLOCATORS = ("global", "lamp", "owl", "dp", "unipruning")
"""Per-layer allocators of a sparsity budget; ``unipruning`` also takes N:M (:mod:`secateurs.passes.unipruning`)."""


@dataclasses.dataclass(frozen=True)
class SparsityRecord:
    """Per-layer sparsity after a :class:`SparsifyWeights` pass.

    ``peak_statistics_bytes`` is the most calibration state (input norms / Hessians, plus block inputs in
    sequential mode) alive at once: sequential calibration keeps it at one block's worth. ``skipped`` lists every
    linear / conv layer left dense, with the reason: an output head, a weight tied to the input embedding,
    ignored by the user, or (under N:M) input channels that are not a multiple of M. ``search`` is the
    UniPruning search (``allocate="unipruning"``): per-step losses, estimated against measured loss, time.
    """

    criterion: str
    pattern: str
    layers: tuple[tuple[str, float], ...]
    peak_statistics_bytes: int = 0
    skipped: tuple[tuple[str, str], ...] = ()
    search: UniSearch | None = None


def nm_pattern_holds(before: Graph, result: PassResult) -> list[str]:
    """N:M sparsity holds on every layer the record lists (what TensorRT's sparse kernels need)."""
    record = result.record
    if not isinstance(record, SparsityRecord) or ":" not in record.pattern:
        return []
    n, m = (int(v) for v in record.pattern.split(":"))
    return check_nm(result.graph.module, n, m, [name for name, _ in record.layers])


class SparsifyWeights(Pass):
    """Transform pass: zero weights by a criterion, unstructured (``ratio``) or N:M (``nm=(2, 4)``).

    Requires :class:`DependencyInfo` (to leave output layers alone). Shapes do not change, so the graph stays
    valid.
    """

    requires = (DependencyInfo,)
    transforms = True
    transactional = True
    ensures = (nm_pattern_holds,)

    def __init__(
        self,
        ratio: float = 0.5,
        *,
        nm: tuple[int, int] | None = None,
        criterion: str = "magnitude",
        calib: Iterable[Any] | None = None,
        ignore: tuple[str, ...] = (),
        include_outputs: bool = False,
        keep_masks: bool = True,
        block: int = 128,
        damp: float = 0.01,
        sequential: bool = False,
        max_layer_sparsity: float = 0.95,
        layer_ratios: dict[str, float] | None = None,
        owl: bool = False,
        owl_lambda: float = 0.08,
        owl_m: float = 5.0,
        allocate: str | None = None,
        unipruning_steps: int = 16,
    ) -> None:
        """Create the pass.

        Args:
            ratio: Unstructured fraction of weights to zero per layer, in [0, 1) (ignored with ``nm``).
            nm: ``(n, m)``: ``n`` zeros in every ``m`` consecutive input weights (2:4 by default for N:M).
            criterion: One of :data:`SPARSITY_CRITERIA`.
            calib: Calibration batches for ``wanda`` / ``sparsegpt`` (defaults to the example inputs).
            ignore: Module names (or prefixes ending in ``.``) left dense.
            include_outputs: Also sparsify the output heads (LM head, classifier, pooler) and tied weights.
            keep_masks: Keep masks attached (``torch.nn.utils.prune``) so training keeps them; else zero only.
            block: SparseGPT column block size.
            damp: SparseGPT dampening, as a fraction of the mean Hessian diagonal.
            max_layer_sparsity: The cap per layer for ``global_magnitude``.
            layer_ratios: Unstructured ratio per layer name (layers not listed use ``ratio``).
            owl: Outlier-weighted layer-wise sparsity (OWL): layers with more outliers in their Wanda scores
                (above ``owl_m`` x the layer mean) get up to ``owl_lambda`` less sparsity, others more, and the
                total over all targeted weights stays ``ratio``. Unstructured only; uses ``calib``.
            owl_lambda: OWL's maximum deviation from ``ratio``.
            owl_m: OWL's outlier threshold.
            allocate: Spread an unstructured ``ratio`` over the layers with an allocator of the depth issue:
                ``"global"`` (one magnitude threshold, like ``global_magnitude``), ``"lamp"`` (LAMP scores ranked
                globally), ``"owl"`` (same as ``owl=True``) or ``"dp"`` (least squared magnitude removed);
                every layer is capped at ``max_layer_sparsity``. ``"unipruning"`` (unstructured or N:M): the
                criterion's saliency (``wanda`` or ``magnitude``) anchors a search driven by the masked model's
                distance to the dense outputs on ``calib``, with a mirror-descent controller spreading the budget
                (each layer within ``ratio +- 0.1``; see :mod:`secateurs.passes.unipruning`); no weight changes.
            unipruning_steps: Feedback steps of ``allocate="unipruning"`` (one calibration batch each).
            sequential: Calibrate block by block (LLM style): block ``i``'s statistics come from the outputs of
                the already pruned blocks before it, and only one block's statistics live at a time.

        Under ``torchrun`` (see :mod:`secateurs.distributed`) every rank runs its share of ``calib`` and the
        statistics are summed over the ranks, so all ranks choose the same masks.

        """
        if criterion not in SPARSITY_CRITERIA:
            raise BudgetError(f"unknown sparsity criterion {criterion!r}; choose from {SPARSITY_CRITERIA}")
        if nm is not None:
            n, m = nm
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
                raise BudgetError(f"N:M needs 0 < N < M, got {n}:{m}")
        elif not 0.0 <= ratio < 1.0 or math.isnan(ratio):
            raise BudgetError(f"sparsity ratio must be in [0, 1), got {ratio!r}")
        self.ratio, self.nm, self.criterion, self.calib = ratio, nm, criterion, calib
        self.ignore, self.include_outputs, self.keep_masks = ignore, include_outputs, keep_masks
        self.block, self.damp, self.sequential = block, damp, sequential
        self.max_layer_sparsity = max_layer_sparsity
        self.owl, self.owl_lambda, self.owl_m = owl, owl_lambda, owl_m
        self._layer_ratios: dict[str, float] = dict(layer_ratios or {})
        self._snap = Snapshot()  # the transaction of the running call (see run)
        self._chosen: dict[str, torch.Tensor] = {}  # masks a search chose (unipruning), by layer
        for name, value in self._layer_ratios.items():
            if not 0.0 <= value < 1.0:
                raise BudgetError(f"layer ratio of '{name}' must be in [0, 1), got {value!r}")
        if allocate is not None and allocate not in SPARSITY_ALLOCATORS:
            raise BudgetError(f"sparsity allocator must be one of {', '.join(SPARSITY_ALLOCATORS)}, got {allocate!r}")
        self.allocate = allocate
        self.owl = owl or allocate == "owl"
        self.unipruning_steps = unipruning_steps
        if (self.owl or layer_ratios or allocate not in (None, "unipruning")) and nm is not None:
            raise BudgetError("per-layer ratios and allocators are for unstructured sparsity, not N:M (unipruning "
                              "takes N:M)")
        if unipruning_steps != 16 and allocate != "unipruning":
            raise BudgetError(f"unipruning_steps={unipruning_steps!r} is read by allocate='unipruning' only, and the "
                              f"allocator is {allocate!r}")
        if allocate == "unipruning":
            if criterion not in ("wanda", "magnitude"):
                raise BudgetError(f"unipruning anchors its search on a saliency and changes no weight: its criterion "
                                  f"is wanda or magnitude, not {criterion!r}")
            if sequential or owl or layer_ratios:
                raise BudgetError("unipruning sets every layer's sparsity itself from the whole model's outputs: "
                                  "drop sequential, owl and layer_ratios")
            if not isinstance(unipruning_steps, int) or unipruning_steps < 1:
                raise BudgetError(f"unipruning_steps must be an integer >= 1, got {unipruning_steps!r}")
        if criterion == "global_magnitude" and nm is not None:
            raise BudgetError("global_magnitude is unstructured; use magnitude, wanda or sparsegpt for N:M")
        self._peak = 0

    def _targets(self, graph: Graph) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
        return select_layers(graph, _is_target, self.ignore, self.include_outputs)

    def _eligible(self, targets: list[tuple[str, nn.Module]]) -> tuple[list[tuple[str, nn.Module]],
                                                                         list[tuple[str, str]]]:
        """The targets N:M applies to, and the skipped ones with the reason (all of them when unstructured)."""
        skipped: list[tuple[str, str]] = []
        if self.nm is None:
            return targets, skipped
        # Like TensorRT, N:M applies to layers whose input channels split into groups of M; the others
        # (a 3-channel stem) stay dense and are reported. None eligible at all is an error.
        eligible = []
        for name, mod in targets:
            cols = _weight(mod).shape[_in_dim(mod)]
            if cols % self.nm[1]:
                skipped.append((name, f"{cols} input channels, not a multiple of {self.nm[1]}"))
            else:
                eligible.append((name, mod))
        if targets and not eligible:
            name, why = skipped[0]
            raise BudgetError(f"no layer can be {self.nm[0]}:{self.nm[1]} sparse: layer '{name}' has {why} "
                              f"(and {len(skipped) - 1} more like it); ignore them or pad them")
        if skipped:
            log.warning("%d layer(s) stay dense under %d:%d sparsity: %s", len(skipped), *self.nm,
                        ", ".join(f"{n} ({w})" for n, w in skipped[:5]))
        return eligible, skipped

    def _pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm is not None else f"{self.ratio:.0%} unstructured"

    def sparsify_layers(self, targets: list[tuple[str, nn.Module]],
                        calibrate: Callable[[], Any] | None = None) -> SparsityRecord:
        """Sparsify ``targets`` directly, without a graph: the block-by-block (streaming) form of :meth:`run`.

        The masks are those :meth:`run` chooses for the same layers and statistics, so a model sparsified one
        block at a time, each block calibrated on the previous (already pruned) blocks' outputs, equals
        ``sequential=True``. Under ``torchrun`` the statistics are summed over the ranks.

        Args:
            targets: ``(name, module)`` of the linear / conv layers to sparsify.
            calibrate: For ``wanda`` / ``sparsegpt``: runs this rank's calibration inputs through the modules
                (their inputs are read with hooks while it runs).

        Returns:
            The per-layer record.

        Raises:
            BudgetError: The criterion or allocator needs every layer at once (``global_magnitude``, OWL,
                ``allocate``), or a calibrated criterion got no ``calibrate``.

        """
        if self.criterion == "global_magnitude" or self.owl or self.allocate is not None:
            raise BudgetError(f"sparsity criterion {self.criterion!r} with allocator {self.allocate or 'owl'!r} "
                              "ranks every layer at once; it cannot run block by block")
        targets, skipped = self._eligible(targets)
        stats: dict[str, torch.Tensor] = {}
        if self.criterion in ("wanda", "sparsegpt") and targets:
            if calibrate is None:
                raise BudgetError(f"{self.criterion} sparsity needs calibration inputs; got none")
            acc: dict[str, torch.Tensor] = {}
            hooks = [mod.register_forward_pre_hook(self._collector(name, acc)) for name, mod in targets]
            try:
                with torch.no_grad():
                    calibrate()
            finally:
                for h in hooks:
                    h.remove()
            stats = self._finish(all_reduce_sum(acc, inplace=True))
        layers: list[tuple[str, float]] = []
        with recorded() as self._snap:
            self._apply(targets, stats, layers)
        peak = sum(t.numel() * t.element_size() for t in stats.values())
        return SparsityRecord(self.criterion, self._pattern(), tuple(layers), peak, tuple(skipped))

    def run(self, graph: Graph) -> PassResult:
        """Choose and apply the masks (every edit recorded in the transaction)."""
        with recorded() as self._snap:
            return self._run(graph)

    def _run(self, graph: Graph) -> PassResult:
        chosen, left = self._targets(graph)
        if not chosen:
            why = "; ".join(sorted({w for _, w in left})) or "the model has no linear / conv layer"
            raise BudgetError(f"{self._pattern()} sparsity selects no layer ({len(left)} left dense: {why})")
        targets, skipped = self._eligible(chosen)
        skipped = left + skipped
        layers: list[tuple[str, float]] = []
        self._peak = 0
        self._chosen = {}
        search = None
        if self.allocate == "unipruning":
            search = self._unipruning(graph, targets)
        elif self.owl:
            self._layer_ratios.update(self._owl_ratios(graph, targets))
        elif self.allocate in ("global", "lamp", "dp"):
            self._layer_ratios.update(self._allocated(targets))
        if self.criterion == "global_magnitude":
            self._global(targets, layers)
        elif search is not None:
            try:
                self._apply(targets, {}, layers)
            finally:
                self._chosen = {}  # one bool per targeted weight: not kept past the call
        elif self.sequential and self.criterion != "magnitude":
            self._sequential(graph, targets, layers)
        else:
            stats = self._statistics(graph, targets) if self.criterion in ("wanda", "sparsegpt") else {}
            self._peak = sum(t.numel() * t.element_size() for t in stats.values())
            self._apply(targets, stats, layers)
        record = SparsityRecord(self.criterion, self._pattern(), tuple(layers), self._peak, tuple(skipped), search)
        if not layers:
            return PassResult(graph, False, record)
        # Attached masks rename ``weight`` to ``weight_orig`` (+ ``weight_mask``): capture the model again.
        new = capture_call(graph.module, graph.args, graph.kwargs) if self.keep_masks else graph
        return PassResult(new, True, record)

    def _unipruning(self, graph: Graph, targets: list[tuple[str, nn.Module]]) -> UniSearch:
        """The UniPruning search: its masks go to :meth:`_apply` through ``self._chosen``."""
        norms = self._statistics(graph, targets) if self.criterion == "wanda" else {}
        self._peak = sum(t.numel() * t.element_size() for t in norms.values())
        anchors = {}
        for name, mod in targets:
            score = _as_rows(_weight(mod).detach(), mod).float().abs()
            anchors[name] = score * norms[name].reshape(1, -1).float() if name in norms else score
        calls = shard(calibration_calls(graph, self.calib))
        self._chosen, search = search_masks(graph.module, targets, anchors, calls, ratio=self.ratio, nm=self.nm,
                                            steps=self.unipruning_steps, cap=self.max_layer_sparsity)
        return search

    def _allocated(self, targets: list[tuple[str, nn.Module]]) -> dict[str, float]:
        """Per-layer ratios from a global ranking of magnitude / LAMP scores, or the DP allocator."""
        mags = [_weight(mod).detach().abs().double().reshape(-1) for _, mod in targets]
        if self.allocate == "dp":
            from secateurs.ir.depgraph import ChannelGroup
            from secateurs.passes.allocate import AllocateBudget

            groups = [ChannelGroup(i, m.numel(), (), 1) for i, m in enumerate(mags)]
            alloc = AllocateBudget(self.ratio, "dp", min_keep=1 - self.max_layer_sparsity)
            ratios = alloc.allocate(groups, {i: m.numpy() for i, m in enumerate(mags)}, {g.id: 1.0 for g in groups})
            # the DP's levels and its per-layer rounding of the budget land near it: meet it exactly in whole
            # weights, the difference spread over the layers by size within their caps
            sizes = [m.numel() for m in mags]
            removed = [round(ratios[i] * n) for i, n in enumerate(sizes)]
            caps = [int(n * self.max_layer_sparsity) for n in sizes]
            want = int(round(sum(sizes) * self.ratio))
            short = want - sum(removed)
            exact = [short * n / sum(sizes) for n in sizes]
            shares = [int(math.trunc(x)) for x in exact]
            for i in sorted(range(len(sizes)), key=lambda i: -abs(exact[i] - shares[i]))[:abs(short - sum(shares))]:
                shares[i] += 1 if short > 0 else -1
            order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
            for left in ([shares[i] for i in order], None):  # the shares, then what the caps left over
                for k, i in enumerate(order):
                    step = left[k] if left is not None else want - sum(removed)
                    removed[i] += min(step, caps[i] - removed[i]) if step > 0 else max(step, -removed[i])
            return {name: removed[i] / sizes[i] for i, (name, _) in enumerate(targets)}
        keys = []
        for m in mags:
            sq = torch.sort(m).values ** 2
            if self.allocate == "lamp":
                tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
                keys.append(sq / tail.clamp_min(1e-300))
            else:
                keys.append(sq)
        caps = [int(k.numel() * self.max_layer_sparsity) for k in keys]
        want = int(round(sum(k.numel() for k in keys) * self.ratio))
        if want > sum(caps):
            raise BudgetError(f"{self.ratio:.0%} sparsity exceeds the per-layer cap {self.max_layer_sparsity:.0%}")
        pool = torch.cat([k[:c] for k, c in zip(keys, caps, strict=True)])
        owner = torch.cat([torch.full((c,), i) for i, c in enumerate(caps)])
        chosen = owner[torch.argsort(pool, stable=True)[:want]]
        counts = torch.bincount(chosen, minlength=len(keys))
        return {name: float(counts[i]) / keys[i].numel() for i, (name, _) in enumerate(targets)}

    def _owl_ratios(self, graph: Graph, targets: list[tuple[str, nn.Module]]) -> dict[str, float]:
        """OWL: per-layer ratios from the outlier fraction of Wanda scores, re-centred to ``ratio``."""
        criterion, self.criterion = self.criterion, "wanda"
        try:
            norms = self._statistics(graph, targets)
        finally:
            self.criterion = criterion
        names, outliers, sizes = [], [], []
        for name, mod in targets:
            score = _as_rows(_weight(mod).detach(), mod).double().abs() * norms[name].reshape(1, -1)
            outliers.append(float((score > self.owl_m * score.mean()).double().mean()))
            names.append(name)
            sizes.append(float(score.numel()))
        d = torch.tensor(outliers, dtype=torch.float64)
        spread = float(d.max() - d.min())
        norm = (d - d.min()) / spread if spread > 0 else torch.zeros_like(d)
        raw = self.ratio + self.owl_lambda * (1 - 2 * norm)
        w = torch.tensor(sizes, dtype=torch.float64)
        lo, hi = -1.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            r = (raw + mid).clamp(0.0, self.max_layer_sparsity)
            lo, hi = (mid, hi) if float((r * w).sum() / w.sum()) < self.ratio else (lo, mid)
        r = (raw + hi).clamp(0.0, self.max_layer_sparsity)
        return {n: float(v) for n, v in zip(names, r, strict=True)}

    def _global(self, targets: list[tuple[str, nn.Module]], layers: list[tuple[str, float]]) -> None:
        """One magnitude threshold for every layer, each capped at ``max_layer_sparsity``."""
        weights = [(name, mod, _weight(mod).detach().abs().double().reshape(-1)) for name, mod in targets]
        total = sum(w.numel() for _, _, w in weights)
        want = int(round(total * self.ratio))
        caps = [int(w.numel() * self.max_layer_sparsity) for _, _, w in weights]
        if want > sum(caps):
            raise BudgetError(f"{self.ratio:.0%} sparsity exceeds the per-layer cap {self.max_layer_sparsity:.0%}")
        ordered = [torch.sort(w).values for _, _, w in weights]
        lo, hi = 0.0, float(max(float(o[-1]) for o in ordered)) + 1.0

        def removed(t: float) -> list[int]:
            return [min(int(torch.searchsorted(o, torch.tensor(t, dtype=o.dtype))), c)
                    for o, c in zip(ordered, caps, strict=True)]

        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(removed(mid)) < want else (lo, mid)
        counts = removed(hi)
        extra = sum(counts) - want
        for i in sorted(range(len(counts)), key=lambda i: -counts[i]):  # trim ties so the total is exact
            take = min(extra, counts[i])
            counts[i] -= take
            extra -= take
        with torch.no_grad():
            for (name, mod, w), k in zip(weights, counts, strict=True):
                keep = torch.ones(w.numel(), dtype=torch.bool)
                if k:
                    keep[w.topk(k, largest=False).indices] = False
                weight = _weight(mod)
                mask = keep.reshape(weight.shape).to(weight.dtype)
                self._mask(mod, weight, mask)
                layers.append((name, float(1 - mask.mean())))

    def _apply(self, targets: list[tuple[str, nn.Module]], stats: dict[str, torch.Tensor],
               layers: list[tuple[str, float]]) -> None:
        """Choose and apply the masks of ``targets`` from their statistics."""
        with torch.no_grad():
            for name, mod in track(targets, "sparsify layers"):
                weight = _weight(mod)
                w = weight.detach()
                rows = _as_rows(w, mod).double()
                if name in self._chosen:
                    keep = self._chosen[name]
                elif self.criterion == "sparsegpt":
                    ratio = self._layer_ratios.get(name, self.ratio)
                    new_rows, keep = _sparsegpt(rows, stats[name], ratio, self.nm, self.block, self.damp)
                    self._snap.record_values(weight)
                    weight.copy_(_from_rows(new_rows, w, mod).to(w.dtype))
                else:
                    score = rows.abs()
                    if self.criterion == "wanda":
                        score = score * stats[name].reshape(1, -1)
                    layer_ratio = self._layer_ratios.get(name)
                    if self.nm is not None:
                        keep = _nm_mask(score, *self.nm)
                    elif layer_ratio is not None and self.criterion == "wanda":  # a layer's own count, exactly,
                        keep = _row_mask(score, int(round(score.numel() * layer_ratio)))  # split over its rows
                    else:
                        keep = _unstructured_mask(score, self.ratio if layer_ratio is None else layer_ratio,
                                                  per_row=self.criterion == "wanda")
                mask = _from_rows(keep, w, mod).to(w.dtype)
                self._mask(mod, weight, mask)
                layers.append((name, float(1 - mask.mean())))

    def _mask(self, mod: nn.Module, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Attach ``mask`` to ``mod`` (``keep_masks``) or zero ``weight`` by it, recorded in the transaction."""
        if self.keep_masks:
            self._snap.record_module(mod)
            torch_prune.custom_from_mask(mod, "weight", mask)
        else:
            self._snap.record_values(weight)
            weight.mul_(mask)

    def _sequential(self, graph: Graph, targets: list[tuple[str, nn.Module]],
                    layers: list[tuple[str, float]]) -> None:
        """Block by block: statistics from the (already pruned) previous blocks' outputs, then prune the block.

        Only one block's statistics and one set of block inputs are alive at a time.
        """
        model = graph.module
        blocks = find_blocks(model, graph.args, graph.kwargs, graph)
        lists: dict[str, list[str]] = {}
        for b in blocks:
            lists.setdefault(b.rpartition(".")[0], []).append(b)
        if not lists:
            raise BudgetError("sequential calibration needs a list of residual blocks; none was found")
        chain = max(lists.values(), key=len)
        first = model.get_submodule(chain[0])
        inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        class _Stop(Exception):  # noqa: N818 - control flow only
            pass

        def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for args, kwargs in shard(calibration_calls(graph, self.calib)):
                    try:
                        model(*args, **kwargs)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        inside = set(chain)
        outside = [(n, m) for n, m in targets if not any(n.startswith(b + ".") for b in inside)]
        try:
            for b in track(chain, "sequential blocks"):
                block = model.get_submodule(b)
                mine = [(n, m) for n, m in targets if n.startswith(b + ".")]
                stats = self._block_statistics(block, b, mine, inputs)
                live = sum(t.numel() * t.element_size() for t in stats.values())
                live += sum(a.numel() * a.element_size() for args, _ in inputs for a in args
                            if isinstance(a, torch.Tensor))
                self._peak = max(self._peak, live)
                self._apply(mine, stats, layers)
                del stats
                with torch.no_grad():
                    inputs = [((_hidden_out(block(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
        finally:
            model.train(was_training)
        if outside:
            stats = self._statistics(graph, outside)
            self._peak = max(self._peak, sum(t.numel() * t.element_size() for t in stats.values()))
            self._apply(outside, stats, layers)

    def _block_statistics(self, block: nn.Module, prefix: str, mine: list[tuple[str, nn.Module]],
                          inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> dict[str, torch.Tensor]:
        acc: dict[str, torch.Tensor] = {}
        hooks = [mod.register_forward_pre_hook(self._collector(name, acc)) for name, mod in mine]
        try:
            with torch.no_grad():
                for args, kwargs in inputs:
                    block(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return self._finish(all_reduce_sum(acc, inplace=True))

    def _collector(self, name: str, acc: dict[str, torch.Tensor]) -> Any:
        def hook(m: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().double()
            if isinstance(m, nn.modules.conv._ConvNd):
                # statistics per input channel (kernel taps of a channel share its norm / Hessian)
                x = x.movedim(1, -1)
            x = x.reshape(-1, x.shape[-1])
            if self.criterion == "wanda":
                acc[name] = acc.get(name, torch.zeros(x.shape[-1], dtype=torch.float64)) + x.pow(2).sum(0)
            else:
                acc[name] = acc.get(name, torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)) + x.t() @ x

        return hook

    def _finish(self, acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.sqrt() for k, v in acc.items()} if self.criterion == "wanda" else acc

    def _statistics(self, graph: Graph, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
        """Per target: input-channel norms (wanda) or the Hessian ``X^T X`` (sparsegpt) over calibration."""
        acc: dict[str, torch.Tensor] = {}
        hooks = [mod.register_forward_pre_hook(self._collector(name, acc)) for name, mod in targets]
        run_calibration(graph.module, shard(calibration_calls(graph, self.calib)), hooks)
        return self._finish(all_reduce_sum(acc, inplace=True))


def _hidden_out(out: Any) -> torch.Tensor:
    t = first_tensor(out)
    if t is None:
        raise BudgetError("a block returned no tensor; sequential calibration cannot feed the next block")
    return t.detach()
