"""Layer-adaptive budget allocation: how much of each channel group to prune for a total budget.

Each allocator is an analysis pass that reads :class:`DependencyInfo` and :class:`ChannelScores` and writes a
:class:`LayerBudget` (a fraction to remove per group); :class:`PruneChannels` follows it when present.
Budgets are a fraction of the eligible groups' channels (``unit="channels"``), of the parameters those
channels own (``unit="params"``), of the FLOPs they cost on the example inputs (``unit="flops"``) or of the
time their layers take, measured with a :class:`~secateurs.modeling.latency.LatencyTable`
(``unit="latency"``); each channel is weighted by what removing it saves. A latency budget can be a
``speedup`` of the whole model instead of a ratio ("make it 1.5x faster").

Allocators:
    ``global``: one ranking of raw channel scores across groups (global magnitude), with a per-group floor.
    ``lamp``: LAMP scores, ``s_i^2 / sum_{j >= i} s_j^2`` over a group's channels sorted ascending, ranked
        globally; scale-invariant per layer.
    ``owl``: outlier-weighted layer-wise sparsity: groups with more outlier channels (score above ``m`` times
        the group mean) are pruned less, within ``target +- lam``, re-centred to meet the budget.
    ``ecoflap``: coarse-to-fine from a zeroth-order global importance (ECoFLaP's idea): each group's
        first-order importance ``|sum(w * dL/dw)|`` is measured with forward passes only, as the central
        difference of the loss when the group's weights are scaled by ``1 +- mu`` (the directional derivative
        along ``w``); more important groups are pruned less (within ``target +- lam``), re-centred.
    ``cfsp``: coarse allocation from block-level activation importance (CFSP's idea): every group inherits
        the block influence (``1 - cos(input, output)``) of the residual block it lives in; blocks that change
        the stream more are pruned less (within ``target +- lam``), re-centred.
    ``dp``: dynamic programming over discrete per-group ratios minimising the summed per-group distortion
        (the squared scores of the removed channels, an output-energy proxy that adds up across layers) under
        the budget.
    ``tyr``: Týr-the-Pruner's search (:mod:`secateurs.passes.tyr`): every group's candidate ratios, coarse to
        fine, measured as the increase of the masked model's distance to the dense outputs with every other
        group pruned at its current ratio (errors accumulated), and the same knapsack over those measured
        losses; the search is recorded in ``LayerBudget.search``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from secateurs.distributed import shard
from secateurs.errors import BudgetError
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo, require_kinds
from secateurs.ir.graph import Graph
from secateurs.modeling.latency import LatencyTable
from secateurs.modeling.rewrite import Snapshot, compensate_biases
from secateurs.passes.base import Pass, PassResult, cost_model
from secateurs.passes.depth import block_influence, find_blocks
from secateurs.passes.hooks import calibration_calls
from secateurs.passes.importance import ChannelScores, default_loss
from secateurs.passes.tyr import TyrSearch, search_ratios

__all__ = ["ALLOCATORS", "AllocateBudget", "BudgetSlot", "LayerBudget"]

ALLOCATORS = ("global", "lamp", "owl", "dp", "ecoflap", "cfsp", "tyr")
UNITS = ("channels", "params", "flops", "latency")


class BudgetSlot(Protocol):
    """What an allocator needs of a group: a unique id and its number of channels (a ``ChannelGroup`` has both)."""

    @property
    def id(self) -> int:
        """Unique key of the group."""

    @property
    def size(self) -> int:
        """Channels of the group."""


@dataclasses.dataclass(frozen=True)
class LayerBudget:
    """Fraction of channels to remove per group id, chosen by ``allocator`` for a total ``ratio``.

    ``weights`` is what one channel of each group is worth in the budget's unit (1, its parameters, or its
    FLOPs on the example inputs). ``model_latency``: with a ``speedup`` target, the whole model's measured
    seconds the budget was derived from. ``search``: what a search allocator did (:class:`TyrSearch` for
    ``tyr``), else None.
    """

    allocator: str
    ratio: float
    unit: str
    ratios: dict[int, float]
    weights: dict[int, float]
    model_latency: float | None = None
    search: TyrSearch | None = None

    def spent(self, info: DependencyInfo) -> float:
        """The fraction of the budget unit these ratios remove (channels rounded as the pruning pass does)."""
        groups = [info.groups[g] for g in self.ratios]
        total = sum(self.weights[g.id] * g.size for g in groups)
        removed = sum(self.weights[g.id] * round(g.size * self.ratios[g.id]) for g in groups)
        return removed / total if total else 0.0


class AllocateBudget(Pass):
    """Analysis pass: spread a total pruning budget over the channel groups (see the module docstring)."""

    requires = (DependencyInfo, ChannelScores)
    provides = (LayerBudget,)

    def __init__(
        self,
        ratio: float,
        allocator: str = "global",
        *,
        unit: str = "channels",
        kinds: tuple[str, ...] = ("ffn", "heads", "channels"),
        min_keep: float = 0.1,
        owl_lambda: float = 0.08,
        owl_m: float = 5.0,
        dp_levels: int = 20,
        calib: Iterable[Any] | None = None,
        latency: LatencyTable | None = None,
        speedup: float | None = None,
        kind_ratios: Mapping[str, float] | Sequence[tuple[str, float]] = (),
        bias_compensation: bool | None = None,
    ) -> None:
        """Create the pass.

        Args:
            ratio: Total fraction to remove, in [0, 1).
            allocator: One of :data:`ALLOCATORS`.
            unit: ``"channels"``, ``"params"`` or ``"flops"``.
            kinds: Structure kinds the budget is spread over (``ChannelGroup.kind``).
            min_keep: Per-group floor as a fraction of its channels.
            owl_lambda: Maximum deviation from the uniform ratio (OWL, ECoFLaP, CFSP).
            owl_m: OWL's outlier threshold (multiple of the group mean score).
            dp_levels: Number of discrete ratios the DP allocator chooses from per group.
            calib: Calibration batches for ``ecoflap`` and ``cfsp`` (defaults to the example inputs).
            latency: The measured table for ``unit="latency"``.
            speedup: With ``unit="latency"``: the whole model's target speed-up (> 1); ``ratio`` is then
                derived from the measured model latency and the time the prunable layers take.
            kind_ratios: Per structure kind, its own budget (``{"ffn": 0.3, "heads": 0.25}``): each kind's
                groups share that kind's fraction, allocated separately; ``ratio`` and ``kinds`` are then unused.
            bias_compensation: Whether the pruning pass compensates biases, for ``tyr`` to measure its candidates
                as they will be pruned (None: as the pass decides by default, with ``flap`` scores).

        """
        if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
            raise BudgetError(f"budget ratio must be in [0, 1), got {ratio!r}")
        if allocator not in ALLOCATORS:
            raise BudgetError(f"unknown allocator {allocator!r}; choose from {ALLOCATORS}")
        if unit not in UNITS:
            raise BudgetError(f"unit must be one of {UNITS}, got {unit!r}")
        self.ratio, self.allocator, self.unit, self.kinds = ratio, allocator, unit, kinds
        self.min_keep, self.owl_lambda, self.owl_m, self.dp_levels = min_keep, owl_lambda, owl_m, dp_levels
        self._w: dict[int, float] = {}
        self.calib = calib
        if unit == "latency" and latency is None:
            raise BudgetError("a latency budget needs a LatencyTable (latency=...)")
        if speedup is not None and (unit != "latency" or not speedup > 1.0):
            raise BudgetError(f"speedup needs unit='latency' and a value > 1, got {speedup!r}")
        self.latency, self.speedup = latency, speedup
        self.kind_ratios = {k: float(v) for k, v in dict(kind_ratios).items()}
        self.bias_compensation = bias_compensation
        for kind, value in self.kind_ratios.items():
            if not 0.0 <= value < 1.0 or math.isnan(value):
                raise BudgetError(f"budget ratio of {kind!r} must be in [0, 1), got {value!r}")
        if "hidden" in self.kind_ratios:
            raise BudgetError("the hidden size is one group across the whole model, so an allocator has nothing to "
                              "spread it over: prune it with hidden= and no allocator (or in a separate step)")
        if self.kind_ratios and speedup is not None:
            raise BudgetError("a speedup target sets the whole budget; do not combine it with per-structure ratios")

    def run(self, graph: Any) -> PassResult:
        """Compute per-group ratios (on a captured PyTorch graph or an ONNX one: both are costed the same way)."""
        if self.allocator in ("ecoflap", "cfsp", "tyr") and not isinstance(graph, Graph):
            raise BudgetError(f"the {self.allocator} allocator runs the model (its loss or its blocks' "
                              "activations); an ONNX file takes global, lamp, owl or dp")
        info = graph.analysis(DependencyInfo)
        scores = graph.analysis(ChannelScores).scores
        require_kinds(info, self.kind_ratios.items())
        kinds = tuple(k for k, v in self.kind_ratios.items() if v > 0) if self.kind_ratios else self.kinds
        groups = [g for g in info.iter_groups() if g.kind in kinds and g.mixed_at is None and g.size > 1]
        if not groups:
            raise BudgetError(f"no prunable groups of kinds {kinds} to spread the budget over")
        total = None
        if self.unit == "flops":
            costs = cost_model(graph, info).per_channel()
            self._w = {g.id: max(costs[g.id][1], 0.0) for g in groups}
        elif self.unit == "latency":
            assert self.latency is not None
            self._w = self.latency.group_costs(graph, info, [g.id for g in groups])
            if self.speedup is not None:
                total = self.latency.model_latency(graph)
                prunable = sum(self._w[g.id] * g.size for g in groups)
                needed = total * (1 - 1 / self.speedup)
                if prunable <= 0 or needed >= prunable:
                    raise BudgetError(
                        f"a {self.speedup}x speed-up needs {needed * 1e3:.2f} ms removed, but the prunable layers take "
                        f"{prunable * 1e3:.2f} ms of {total * 1e3:.2f} ms"
                    )
                self.ratio = needed / prunable
        else:
            self._w = {g.id: float(g.params_per_channel) if self.unit == "params" else 1.0 for g in groups}
        importance = None
        search = None
        if self.allocator == "ecoflap":
            importance = self._zeroth_order(graph, groups)
        elif self.allocator == "cfsp":
            importance = self._block_influence(graph, groups)
        if self.allocator == "tyr":
            budgets = ([([i for i, g in enumerate(groups) if g.kind == kind], r) for kind, r in self.kind_ratios.items()
                        if r > 0] if self.kind_ratios else [(list(range(len(groups))), self.ratio)])
            budgets = [(idx, r) for idx, r in budgets if r > 0]
            ratios, search = {g.id: 0.0 for g in groups}, None
        if self.allocator == "tyr" and budgets:
            ratios, search = search_ratios(graph.module, info, groups, scores,
                                           shard(calibration_calls(graph, self.calib)), budgets,
                                           weights=self._w, cap=lambda g: 1 - self._floor(g) / g.size,
                                           knapsack=self._knapsack,
                                           recentre=self._recentre, compensate=self._compensator(graph, info))
        elif self.allocator != "tyr":
            ratios = self.allocate(groups, scores, self._w, importance)
        budget = LayerBudget(self.allocator, self.ratio, self.unit, ratios, dict(self._w), total, search)
        graph.analyses[LayerBudget] = budget
        return PassResult(graph, False, budget)

    def allocate(self, groups: Sequence[BudgetSlot], scores: Mapping[int, np.ndarray], weights: Mapping[int, float],
                 importance: np.ndarray | None = None, kinds: Mapping[int, str] | None = None) -> dict[int, float]:
        """Per-group ratios for ``groups`` (from one graph, or gathered from many, e.g. block by block).

        Args:
            groups: The groups sharing the budget (anything with a unique ``id`` and a ``size``).
            scores: Channel scores per group id.
            weights: What one channel of each group is worth in the budget's unit.
            importance: Per group (in ``groups`` order), its importance for ``ecoflap`` / ``cfsp``.
            kinds: Per group id, its structure kind; needed with ``kind_ratios`` (``ChannelGroup.kind`` otherwise).

        Returns:
            Fraction to remove per group id.

        """
        self._w = dict(weights)
        if self.allocator == "tyr":
            raise BudgetError("the tyr allocator measures the whole model's loss for every candidate; it allocates "
                              "on a captured model (AllocateBudget.run), not from gathered groups")
        if self.allocator in ("ecoflap", "cfsp") and (importance is None or len(importance) != len(groups)):
            raise BudgetError(f"the {self.allocator} allocator needs one importance value per group")
        if not self.kind_ratios:
            return self._allocate(list(groups), scores, self.ratio, importance)
        kind_of = dict(kinds) if kinds is not None else {g.id: str(getattr(g, "kind", "")) for g in groups}
        out: dict[int, float] = {}
        for kind, ratio in self.kind_ratios.items():
            idx = [i for i, g in enumerate(groups) if kind_of.get(g.id) == kind]
            if not idx:
                continue
            sub = [groups[i] for i in idx]
            out.update(self._allocate(sub, scores, ratio, importance[idx] if importance is not None else None))
        return out

    def _allocate(self, groups: list[BudgetSlot], scores: Mapping[int, np.ndarray], ratio: float,
                  importance: np.ndarray | None) -> dict[int, float]:
        if ratio <= 0:
            return {g.id: 0.0 for g in groups}
        if importance is not None and self.allocator in ("ecoflap", "cfsp"):
            return self._by_importance(groups, importance, ratio)
        method = {"global": self._ranked, "lamp": self._ranked, "owl": self._owl, "dp": self._dp}[self.allocator]
        return method(groups, scores, ratio)

    def _compensator(self, graph: Graph, info: DependencyInfo) -> Callable[[dict[int, np.ndarray]],
                                                                          Callable[[], None]] | None:
        """The bias compensation the pruning pass will apply (FLAP's default rule, or ``bias_compensation``)."""
        scored = graph.analysis(ChannelScores)
        wanted = (scored.criterion == "flap" if self.bias_compensation is None else self.bias_compensation)
        if not wanted or not scored.inputs:
            return None
        means = {k: v.mean for k, v in scored.inputs.items()}

        def apply(keep: dict[int, np.ndarray]) -> Callable[[], None]:
            snap = Snapshot()
            try:
                compensate_biases(graph, info, keep, means, snap)
            except BaseException:  # what was compensated before the failure is put back
                snap.restore()
                raise
            return snap.restore

        return apply

    def _floor(self, g: BudgetSlot) -> int:
        return max(1, math.ceil(g.size * self.min_keep))

    def _ranked(self, groups: list[BudgetSlot], scores: Mapping[int, np.ndarray], ratio: float) -> dict[int, float]:
        """Remove the globally lowest channels (raw scores, or LAMP scores) until the budget is spent."""
        entries: list[tuple[float, int, float]] = []
        for g in groups:
            s = np.asarray(scores[g.id], dtype=np.float64)
            if self.allocator == "lamp":
                sq = np.sort(s) ** 2
                tail = np.cumsum(sq[::-1])[::-1]
                key = np.where(tail > 0, sq / np.where(tail > 0, tail, 1.0), 0.0)
            else:
                key = np.sort(s)
            # Only the channels above the floor are candidates; within a group they go lowest first.
            entries.extend((float(k), g.id, self._w[g.id]) for k in key[: g.size - self._floor(g)])
        entries.sort(key=lambda t: t[0])
        target = ratio * sum(self._w[g.id] * g.size for g in groups)
        removed: dict[int, int] = {g.id: 0 for g in groups}
        spent = 0.0
        for _, gid, w in entries:
            if spent + w / 2 > target:
                break
            removed[gid] += 1
            spent += w
        return {g.id: removed[g.id] / g.size for g in groups}

    def _owl(self, groups: list[BudgetSlot], scores: Mapping[int, np.ndarray], ratio: float) -> dict[int, float]:
        """Outlier-weighted ratios: more outliers, less pruning."""
        outliers = []
        for g in groups:
            s = np.asarray(scores[g.id], dtype=np.float64)
            mean = float(s.mean()) if s.size else 0.0
            outliers.append(float((s > self.owl_m * mean).mean()) if mean > 0 else 0.0)
        d = np.asarray(outliers)
        spread = d.max() - d.min()
        norm = (d - d.min()) / spread if spread > 0 else np.zeros_like(d)
        raw = ratio + self.owl_lambda * (1 - 2 * norm)  # most outliers -> ratio - lambda
        return self._recentre(groups, raw, ratio)

    def _by_importance(self, groups: list[BudgetSlot], importance: np.ndarray, ratio: float) -> dict[int, float]:
        """Most important group -> ratio - lambda, least -> ratio + lambda, then re-centred to the budget."""
        spread = importance.max() - importance.min()
        norm = (importance - importance.min()) / spread if spread > 0 else np.zeros_like(importance)
        return self._recentre(groups, ratio + self.owl_lambda * (1 - 2 * norm), ratio)

    def _zeroth_order(self, graph: Graph, groups: list[ChannelGroup]) -> np.ndarray:
        """|d L / d t| at t = 1 for the group's weights scaled by t, by a central difference (forward only)."""
        model = graph.module
        calls = calibration_calls(graph, self.calib)
        mu = 1e-2  # central difference: error O(mu^2); float32 loss noise is divided by 2 mu

        def loss() -> float:
            total = 0.0
            with torch.no_grad():
                for args, kwargs in calls:
                    total += float(default_loss(model(*args, **kwargs)))
            return total

        out = []
        was_training = model.training
        model.eval()
        try:
            for g in groups:
                params = {m.name: model.get_parameter(m.name) for m in g.members if m.is_param}
                masks: dict[str, torch.Tensor] = {}
                for m in g.members:
                    if m.is_param:
                        idx = torch.from_numpy(graph.analysis(DependencyInfo).channel_positions(m, g.id) >= 0)
                        shape = [1] * params[m.name].dim()
                        shape[m.dim] = -1
                        masks.setdefault(m.name, torch.zeros(params[m.name].shape, dtype=torch.bool))
                        masks[m.name] |= idx.view(shape).expand_as(params[m.name])
                originals = {n: p.detach().clone() for n, p in params.items()}
                values = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(torch.where(masks[n], originals[n] * (1 + sign * mu), originals[n]))
                    values.append(loss())
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(originals[n])
                out.append(abs(values[0] - values[1]) / (2 * mu))
        finally:
            model.train(was_training)
        return np.asarray(out)

    def _block_influence(self, graph: Graph, groups: list[ChannelGroup]) -> np.ndarray:
        """Each group's residual block's influence (groups outside any block get the mean)."""
        blocks = find_blocks(graph.module, graph.args, graph.kwargs, graph)
        if not blocks:
            raise BudgetError("cfsp needs residual blocks; none were found")
        influence = block_influence(graph.module, blocks, calibration_calls(graph, self.calib))
        out = []
        for g in groups:
            owners = [b for b in blocks if any(m.name.startswith(b + ".") for m in g.members)]
            out.append(np.mean([influence[b] for b in owners]) if owners else np.nan)
        arr = np.asarray(out, dtype=np.float64)
        return np.where(np.isnan(arr), np.nanmean(arr) if not np.isnan(arr).all() else 0.0, arr)

    def _recentre(self, groups: list[BudgetSlot], raw: np.ndarray, ratio: float) -> dict[int, float]:
        """Shift ``raw`` ratios by one constant so the weighted total meets the budget (floors respected)."""
        w = np.asarray([self._w[g.id] * g.size for g in groups])
        cap = np.asarray([1 - self._floor(g) / g.size for g in groups])
        lo, hi = -1.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            r = np.clip(raw + mid, 0.0, cap)
            if float((r * w).sum() / w.sum()) < ratio:
                lo = mid
            else:
                hi = mid
        r = np.clip(raw + hi, 0.0, cap)
        return {g.id: float(x) for g, x in zip(groups, r, strict=True)}

    def _dp(self, groups: list[BudgetSlot], scores: Mapping[int, np.ndarray], ratio: float) -> dict[int, float]:
        """Knapsack over discrete ratios: least total distortion for at least the budget's removal."""
        options = []
        for g in groups:
            s = np.sort(np.asarray(scores[g.id], dtype=np.float64))
            energy = np.concatenate([[0.0], np.cumsum(s**2)])
            top = g.size - self._floor(g)
            # every channel count for small groups, dp_levels evenly spaced counts for large ones
            counts = range(top + 1) if top <= 64 else sorted({int(round(x)) for x in np.linspace(0, top, self.dp_levels)})
            # output-energy proxy of the removed channels (absolute, additive)
            options.append([(float(energy[k]), k) for k in counts])
        return self._knapsack(groups, options, ratio)

    def _knapsack(self, groups: Sequence[BudgetSlot], candidates: Sequence[Sequence[tuple[float, int]]],
                  ratio: float) -> dict[int, float]:
        """One ``(cost, channels removed)`` candidate per group: the least total cost removing the budget."""
        bins = 1000
        total_w = sum(self._w[g.id] * g.size for g in groups)
        need = int(math.ceil(ratio * bins - 1e-9))
        options = []
        for g, cands in zip(groups, candidates, strict=True):
            found = {(cost, int(round(bins * self._w[g.id] * k / total_w)), k) for cost, k in cands}
            options.append(sorted(found, key=lambda t: t[2]))
        inf = float("inf")
        best = np.full(need + 1, inf)
        best[0] = 0.0
        choice: list[np.ndarray] = []
        for opts in options:
            nxt = np.full(need + 1, inf)
            pick = np.zeros(need + 1, dtype=int)
            for b in range(need + 1):
                if best[b] == inf:
                    continue
                for i, (cost, gain, _) in enumerate(opts):
                    nb = min(need, b + gain)
                    if best[b] + cost < nxt[nb]:
                        nxt[nb] = best[b] + cost
                        pick[nb] = i * (need + 1) + b
            choice.append(pick)
            best = nxt
        if best[need] == inf:
            raise BudgetError(f"the {ratio:.0%} budget cannot be met within the per-group floors")
        out: dict[int, float] = {}
        b = need
        for g, opts, pick in zip(reversed(groups), reversed(options), reversed(choice), strict=True):
            i, prev = divmod(int(pick[b]), need + 1)
            out[g.id] = opts[i][2] / g.size
            b = prev
        return out
