"""Which channels a width pruning keeps: the options, the rounding and floors, and the plan, for both dialects.

:func:`plan_keep` reads only a dependency analysis, channel scores and (for params / FLOPs targets) a
:class:`~secateurs.ir.cost.CostModel`, so the PyTorch pass (:class:`~secateurs.passes.channels.PruneChannels`)
and the ONNX one (:class:`~secateurs.passes.onnx_channels.PruneOnnxChannels`) plan the same way; the options
kept whole and why (:func:`left_alone`) and the refusal of a structure that removes nothing
(:func:`require_removal`) are shared too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from secateurs.errors import BudgetError, VerificationError
from secateurs.ir.depgraph import FLAGS, ChannelGroup, DependencyInfo, FrozenGroup
from secateurs.passes.base import cost_model

__all__ = ["KINDS", "SCOPES", "TARGETS", "VERIFY_MODES", "ChannelOptions", "GroupChange", "check_verify", "eligible",
           "left_alone", "plan_keep", "require_removal", "round_keep", "rounded_away"]

log = logging.getLogger(__name__)

TARGETS = ("channels", "params", "flops")
KINDS = ("heads", "kv_groups", "ffn", "hidden", "channels")
SCOPES = ("local", "global")



VERIFY_MODES = ("fast", "full", "off")
"""The values of ``verify`` besides True (``"fast"``) and False (``"off"``)."""


def check_verify(value: object) -> None:
    """Refuse a ``verify`` that is neither a bool nor one of :data:`VERIFY_MODES`.

    Raises:
        BudgetError: The value, with the ones it can be.

    """
    if not (isinstance(value, bool) or value in VERIFY_MODES):
        raise BudgetError(f"verify must be True, False, 'fast', 'full' or 'off', got {value!r}")

@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    """Options of :class:`PruneChannels`.

    Attributes:
        ratio: Fraction to remove, in [0, 1): of each group's channels (``target="channels"``), or of the
            model's parameters / FLOPs.
        target: ``"channels"``, ``"params"`` or ``"flops"``.
        scope: ``"local"`` (the same fraction of every group) or ``"global"`` (one ranking across groups
            of scores normalised by each group's mean).
        min_keep: Floor per group, as a fraction of its channels (at least one channel always stays).
        round_to: Kept sizes are rounded so every sliced dim stays a multiple of this (tensor cores like 8);
            groups smaller than the rounding are left alone. 1 disables rounding.
        ignore: Module names (or prefixes ending with ``.``) whose groups are never pruned.
        leave: ``(module, reason)``: groups entirely inside ``module`` stay whole, reported with ``reason`` (the
            experts whose neurons ``expert_neurons=`` prunes one expert at a time).
        hidden: Also prune groups whose channels enter a cross-channel statistic (LayerNorm / RMSNorm over
            them: the hidden size / residual stream of a transformer). Off by default.
        kind_ratios: Per-structure ratios, ``(("heads", 0.25), ("ffn", 0.3))``; a kind listed here uses its own
            ratio instead of ``ratio`` (see ``ChannelGroup.kind``). Listing ``hidden`` enables it. Only with
            ``target="channels"``.
        bias_compensation: Fold the calibration mean of every removed input channel into its consumer's bias
            (FLAP); needs ``activation`` or ``flap`` scores. Consumers without a bias are skipped. Default (None):
            on when the scores are ``flap`` with calibration statistics.
        verify: How the rewritten model is checked against the plan: ``"fast"`` (or True, the default) records
            one forward of it and compares every traced shape and, node by node, every value with the masked
            dense model's; ``"full"`` does the same on a ``torch.export`` capture (tens of times slower, and
            proves the pruned model still exports); ``"off"`` (or False) only captures it again.
        max_retries: How many times a group that breaks the model's own code is frozen and the plan redone.
        require: Refuse a structure ratio that selects or removes nothing (off for one block of a streamed model,
            where the whole-model check already ran and a block may lack a kind).

    """

    ratio: float = 0.3
    target: str = "channels"
    scope: str = "local"
    min_keep: float = 0.1
    round_to: int = 8
    ignore: tuple[str, ...] = ()
    leave: tuple[tuple[str, str], ...] = ()
    hidden: bool = False
    kind_ratios: tuple[tuple[str, float], ...] = ()
    bias_compensation: bool | None = None
    verify: bool | str = True
    max_retries: int = 8
    require: bool = True

    def __post_init__(self) -> None:
        """Validate every option with a message naming it."""
        if not isinstance(self.ratio, (int, float)) or math.isnan(self.ratio) or not 0.0 <= self.ratio < 1.0:
            raise BudgetError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if self.target not in TARGETS:
            raise BudgetError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.scope not in SCOPES:
            raise BudgetError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise BudgetError(f"min_keep must be in [0, 1], got {self.min_keep!r}")
        if int(self.round_to) < 1:
            raise BudgetError(f"round_to must be >= 1, got {self.round_to!r}")
        for kind, value in self.kind_ratios:
            if kind not in KINDS:
                raise BudgetError(f"unknown structure kind {kind!r}; choose from {KINDS}")
            if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
                raise BudgetError(f"{kind} ratio must be in [0, 1), got {value!r}")
        check_verify(self.verify)
        if self.kind_ratios and self.target != "channels":
            raise BudgetError("per-structure ratios (heads=, ffn=, ...) work with target='channels' only")

    @property
    def check(self) -> str:
        """``verify`` as one of ``"fast"``, ``"full"``, ``"off"``."""
        if isinstance(self.verify, bool):
            return "fast" if self.verify else "off"
        return self.verify

    def ratio_for(self, kind: str) -> float:
        """The ratio that applies to groups of ``kind``."""
        return dict(self.kind_ratios).get(kind, self.ratio)


@dataclasses.dataclass(frozen=True)
class GroupChange:
    """One pruned group: its name, size before and after, and its structure (``heads``, ``ffn``, ...)."""

    name: str
    before: int
    after: int
    kind: str = "channels"


def _align(group: ChannelGroup, round_to: int) -> int:
    """The kept count's step: every large member's sliced dim (count x its stride) is a multiple of ``round_to``."""
    return math.lcm(*(round_to // math.gcd(round_to, stride) for stride in group.strides))


def round_keep(group: ChannelGroup, kept: int, opts: ChannelOptions) -> int:
    """``kept`` channels of ``group`` moved onto the options' alignment (``round_to``) and floor (``min_keep``)."""
    n = group.size
    align = _align(group, opts.round_to)
    floor = max(1, math.ceil(n * opts.min_keep))
    kept = max(kept, floor)
    if align > 1:
        if n <= align:
            return n
        kept = max(align, int(math.floor(kept / align + 0.5)) * align)
        while kept < floor:
            kept += align
    return min(n, kept)


def _ignored(group: ChannelGroup, ignore: Sequence[str]) -> bool:
    for mod in group.module_names():
        for pat in ignore:
            if mod == pat or (pat.endswith(".") and mod.startswith(pat)) or mod.startswith(pat + "."):
                return True
    return False


def _left(group: ChannelGroup, opts: ChannelOptions) -> str | None:
    """Why ``group`` is left to another pass (every module of it is inside one of ``opts.leave``), or None."""
    mods = group.module_names()
    for prefix, why in opts.leave:
        if mods and all(m == prefix or m.startswith(prefix + ".") for m in mods):
            return why
    return None


def eligible(group: ChannelGroup, opts: ChannelOptions) -> bool:
    """Whether the options let ``group`` be pruned (not ignored; the hidden size only when asked)."""
    hidden_ok = opts.hidden or "hidden" in dict(opts.kind_ratios)
    return (not _ignored(group, opts.ignore) and _left(group, opts) is None
            and (hidden_ok or group.mixed_at is None))


def left_alone(info: DependencyInfo, opts: ChannelOptions) -> list[FrozenGroup]:
    """The groups the options keep whole, each with why (both dialects' pruners report these).

    Ignored by the user, left to another pass, or a hidden size (its channels enter a normalisation) that was
    not asked for.
    """
    out = []
    for g in info.iter_groups():
        names = tuple(sorted({f"{m.name}[{m.dim}]" for m in g.members}))
        if _ignored(g, opts.ignore):
            out.append(FrozenGroup(g.size, names, "ignored by the user"))
        elif (why := _left(g, opts)) is not None:
            out.append(FrozenGroup(g.size, names, why))
        elif g.mixed_at is not None and not eligible(g, opts):
            out.append(FrozenGroup(
                g.size, names, f"hidden size: channels enter a normalisation at {g.mixed_at}; pass hidden=True"
            ))
    return out


def require_removal(info: DependencyInfo, opts: ChannelOptions, keep: dict[int, np.ndarray], exclude: set[int],
                    frozen: Sequence[FrozenGroup]) -> None:
    """Refuse a plan that removes nothing of a structure the options asked to prune (never exit 0 with less done).

    Raises:
        BudgetError: A kind (or the overall ``ratio``) asked for removes no channel: every group it selects is
            ignored, too small for ``round_to`` / ``min_keep``, or frozen because the model's code contradicts it.

    """
    asked = {k: v for k, v in opts.kind_ratios if v > 0}
    if not asked and opts.ratio > 0 and not opts.kind_ratios:
        asked = {"": opts.ratio}
    for kind, ratio in asked.items():
        selected = [g for g in info.iter_groups() if (not kind or g.kind == kind) and eligible(g, opts)
                    and (kind or opts.ratio_for(g.kind) > 0)]
        if any(g.id in keep for g in selected):
            continue
        what = f"{kind}={ratio:g} ({FLAGS.get(kind, kind)})" if kind else f"ratio={ratio:g}"
        verified = [g for g in selected if g.id in exclude]
        if verified:
            reasons = sorted({f.reason for f in frozen if f.reason.startswith("the model's code")})
            raise VerificationError(f"{what} removes nothing: the model's code contradicts pruning {len(verified)} "
                                    f"of the {len(selected)} groups it selects ({'; '.join(reasons[:2])}) and the "
                                    "others keep every channel after rounding")
        if not selected:
            left = {why for g in info.iter_groups() if (not kind or g.kind == kind) and (why := _left(g, opts))}
            reasons = sorted(left) + sorted({f.reason for f in frozen} - left)
            raise BudgetError(f"{what} selects no prunable group in this model"
                              + (f" (frozen: {'; '.join(reasons[:3])})" if reasons else ""))
        raise rounded_away(what, len(selected), min(g.size for g in selected), opts)


def rounded_away(what: str, selected: int, smallest: int, opts: ChannelOptions, where: str = "") -> BudgetError:
    """The error for a kind whose ``selected`` groups all keep every channel after rounding (``where``: in what)."""
    each = f"each of its {selected} groups keeps" if selected > 1 else "its one group keeps"
    return BudgetError(f"{what} removes no channel{where}: {each} every channel "
                       f"after rounding to multiples of round_to={opts.round_to} (--round-to) and the "
                       f"min_keep={opts.min_keep:g} floor (smallest group: {smallest} channels); ask for more or "
                       "lower round_to")


def plan_keep(
    graph: Any,
    info: DependencyInfo,
    scores: dict[int, np.ndarray],
    opts: ChannelOptions,
    exclude: set[int] | None = None,
    per_group: dict[int, float] | None = None,
    cost: Callable[[dict[int, int]], tuple[float, float]] | None = None,
) -> dict[int, np.ndarray]:
    """Choose the channels to keep in every group.

    ``per_group`` (from a budget allocator) gives each listed group its own ratio; other groups stay whole.
    ``cost`` gives (parameters, FLOPs) when each group ``g`` keeps ``kept[g]`` channels, for the ``params`` and
    ``flops`` targets: by default the :class:`~secateurs.ir.cost.CostModel` of ``graph`` (a captured PyTorch
    graph or an ONNX one), so both dialects meet a budget the same way.

    Returns:
        Group id -> boolean keep mask, only for groups that lose channels.

    """
    exclude = exclude or set()
    def ratio_of(g: ChannelGroup) -> float:
        return per_group.get(g.id, 0.0) if per_group is not None else opts.ratio_for(g.kind)

    groups = [g for g in info.iter_groups() if g.id not in exclude and eligible(g, opts) and ratio_of(g) > 0]
    if not groups:
        return {}
    order = {g.id: np.argsort(-scores[g.id], kind="stable") for g in groups}

    def masks_for(kept: dict[int, int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for g in groups:
            k = kept[g.id]
            if k < g.size:
                m = np.zeros(g.size, dtype=bool)
                m[order[g.id][:k]] = True
                out[g.id] = m
        return out

    def local(scale: float) -> dict[int, int]:
        """Every group loses ``scale`` x its kind's ratio (scale 1 for channel targets)."""
        return {g.id: round_keep(g, g.size - int(round(g.size * ratio_of(g) * scale)), opts) for g in groups}

    # Global ranking: scores normalised per group, lowest first; one ranking per structure kind.
    ranked: list[tuple[float, int]] = []
    by_kind: dict[str, list[tuple[float, int]]] = {}
    if opts.scope == "global":
        for g in groups:
            s = scores[g.id]
            mean = float(np.mean(s)) if s.size else 0.0
            norm = s / mean if mean > 0 else np.zeros_like(s)
            ranked.extend((float(v), g.id) for v in norm)
            by_kind.setdefault(g.kind, []).extend((float(v), g.id) for v in norm)
        ranked.sort(key=lambda t: t[0])
        for lst in by_kind.values():
            lst.sort(key=lambda t: t[0])

    def global_(count: int, pool: list[tuple[float, int]] | None = None) -> dict[int, int]:
        removed: dict[int, int] = {}
        for _, gid in (ranked if pool is None else pool)[:count]:
            removed[gid] = removed.get(gid, 0) + 1
        return {g.id: round_keep(g, g.size - removed.get(g.id, 0), opts) for g in groups}

    if per_group is not None:
        return masks_for(local(1.0))
    if opts.target == "channels":
        if opts.scope == "local":
            return masks_for(local(1.0))
        kept: dict[int, int] = {}
        for kind, pool in by_kind.items():
            counts = global_(int(round(len(pool) * opts.ratio_for(kind))), pool)
            kept.update({gid: k for gid, k in counts.items() if info.groups[gid].kind == kind})
        return masks_for(kept)

    if cost is None:
        if graph is None:
            raise BudgetError(f"a {opts.target} target needs the graph to cost the plan")
        cost = cost_model(graph, info).predict

    params0, flops0 = cost({})

    def reached(kept: dict[int, int]) -> bool:
        p, f = cost(kept)
        return (p if opts.target == "params" else f) <= (1 - opts.ratio) * (params0 if opts.target == "params" else flops0)

    if opts.scope == "local":
        lo, hi = 0.0, 1.0 / max(opts.ratio, 1e-9)
        for _ in range(24):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if reached(local(mid)) else (mid, hi)
        best = local(hi)
    else:
        lo_i, hi_i = 0, len(ranked)
        while lo_i < hi_i:
            mid_i = (lo_i + hi_i) // 2
            if reached(global_(mid_i)):
                hi_i = mid_i
            else:
                lo_i = mid_i + 1
        best = global_(lo_i)
    if not reached(best):
        p, f = cost(best)
        got = 1 - (p / params0 if opts.target == "params" else f / max(flops0, 1.0))
        log.warning("target %s -%.0f%% not reachable with the floors; reached -%.1f%%", opts.target,
                    100 * opts.ratio, 100 * got)
    return masks_for(best)
