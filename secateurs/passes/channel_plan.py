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
           "attention_pairs", "check_tensor_parallel", "left_alone", "plan_keep", "require_removal", "round_keep",
           "rounded_away", "shard_attention", "uniform_ratios"]

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


def check_tensor_parallel(value: object) -> None:
    """Refuse a ``tensor_parallel`` that is not a whole number of ranks >= 1.

    Raises:
        BudgetError: Naming the option and its flag.

    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BudgetError(f"tensor_parallel (--tp) must be a whole number of ranks >= 1, got {value!r}")


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
        verify: How the rewritten model is checked against the plan: ``"fast"`` (or True, the default) replays
            one forward of it against the dense recording (no second recording) and compares every traced shape
            with the plan and its outputs with the masked dense model's; a doubt (the forward departs from the
            recording, an output differs) runs the per-node check, which names the culprit. ``"full"`` records
            the pruned model with ``torch.export`` and compares every shape and, node by node, every value (tens
            of times slower, and proves the pruned model still exports); ``"off"`` (or False) only captures it
            again.
        max_retries: How many times a group that breaks the model's own code is frozen and the plan redone.
        require: Refuse a structure ratio that selects or removes nothing (off for one block of a streamed model,
            where the whole-model check already ran and a block may lack a kind).
        uniform: Give every group of a kind the same ratio: an allocator's per-group ratios are replaced by their
            size-weighted mean per kind, so every layer keeps the same sizes (what a plain config expresses).
        tensor_parallel: Keep every pruned size shardable over this many ranks, as serving engines shard them:
            each attention's query heads a multiple of it, its KV groups a multiple of it or a divisor of it
            (engines replicate KV heads then), FFN width and hidden size multiples of it (with ``round_to``).
            1 (default) adds no constraint.

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
    tensor_parallel: int = 1
    uniform: bool = False

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
        check_tensor_parallel(self.tensor_parallel)
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
    bound: str = ""  # the constraint that set ``after`` when it is not the plan's own count (round_to, tp, ...)


def _align(group: ChannelGroup, round_to: int) -> int:
    """The kept count's step: every large member's sliced dim (count x its stride) is a multiple of ``round_to``."""
    return math.lcm(*(round_to // math.gcd(round_to, stride) for stride in group.strides))


def round_keep(group: ChannelGroup, kept: int, opts: ChannelOptions, bounds: dict[int, str] | None = None) -> int:
    """``kept`` channels of ``group`` moved onto the options' alignment (``round_to``) and floor (``min_keep``).

    FFN and hidden sizes are also kept multiples of ``tensor_parallel`` (heads and KV groups:
    :func:`shard_attention`). ``bounds`` gets the group's binding constraint when it moved the count.
    """
    n = group.size
    align = _align(group, opts.round_to)
    tp = opts.tensor_parallel if group.kind in ("ffn", "hidden") else 1
    step = math.lcm(align, tp)
    floor = max(1, math.ceil(n * opts.min_keep))
    out = max(kept, floor)
    if step > 1:
        if n <= step:
            out = n
        else:
            out = max(step, int(math.floor(out / step + 0.5)) * step)
            while out < floor:
                out += step
    out = min(n, out)
    if bounds is not None and out != kept:
        floored = min(n, max(kept, floor))
        plain = round_keep(group, kept, dataclasses.replace(opts, tensor_parallel=1)) if tp > 1 else out
        bounds[group.id] = (f"tp={tp}" if out != plain else f"round_to={opts.round_to}" if plain != floored
                            else "min_keep")
    return out


def _choices(group: ChannelGroup, opts: ChannelOptions) -> list[int]:
    """Every count :func:`round_keep` can give ``group`` (without ``tensor_parallel``), its full size included."""
    n, align = group.size, _align(group, opts.round_to)
    floor = max(1, math.ceil(n * opts.min_keep))
    if n <= align:
        return [n]
    return sorted({*(k for k in range(align, n + 1, align) if k >= floor), n})


def uniform_ratios(ratios: dict[int, float], groups: Sequence[Any]) -> dict[int, float]:
    """``ratios`` (group id -> ratio) with every group of a kind given the kind's size-weighted mean ratio.

    ``groups`` have ``id``, ``kind`` and ``size`` (channel groups, or the streamed path's per-block slots).
    """
    total: dict[str, list[float]] = {}
    for g in groups:
        if g.id in ratios:
            acc = total.setdefault(g.kind, [0.0, 0.0])
            acc[0] += ratios[g.id] * g.size
            acc[1] += g.size
    return {g.id: total[g.kind][0] / total[g.kind][1] for g in groups if g.id in ratios and total[g.kind][1] > 0}


def attention_pairs(info: DependencyInfo) -> dict[int, int]:
    """KV group id -> the heads group of the same attention (query heads per KV group), by their shared modules."""
    heads = [(g.id, set(g.module_names())) for g in info.iter_groups() if g.kind == "heads"]
    out: dict[int, int] = {}
    for g in info.iter_groups():
        if g.kind == "kv_groups":
            mods = set(g.module_names())
            hit = next((h for h, hm in heads if hm & mods), None)
            if hit is not None:
                out[g.id] = hit
    return out


def _nearest(want: int, size: int) -> Callable[[int], tuple[int, bool, int]]:
    """Sort key: nearest ``want``.

    On a tie the larger count, unless it keeps the whole group (then the one that still removes something: a
    ratio asked for is honoured).
    """
    return lambda k: (abs(k - want), k == size and want < size, -k)


def _pair_cost(pick: tuple[int, int], want: tuple[int, int], size: tuple[int, int]) -> tuple[int, float, int]:
    """Sort key of a (KV groups, heads per group) pair.

    Fewest asked-for removals dropped, then nearest the plan (relative to each size), then most query heads kept.
    """
    dropped = sum(p == n and w < n for p, w, n in zip(pick, want, size, strict=True))
    return dropped, sum(abs(p - w) / n for p, w, n in zip(pick, want, size, strict=True)), -pick[0] * pick[1]


def shard_attention(info: DependencyInfo, kept: dict[int, int], free: set[int], opts: ChannelOptions,
                    pairs: dict[int, int], bounds: dict[int, str] | None = None) -> dict[int, int]:
    """``kept`` with every attention's heads and KV groups shardable over ``opts.tensor_parallel`` ranks.

    Per attention (a KV group with its heads group): the KV groups ``g`` a multiple or a divisor of ``tp``, the
    query heads ``g x h`` a multiple of ``tp``; the pair nearest the plan's counts (more kept on ties) among the
    sizes :func:`round_keep` allows. Only groups in ``free`` change. A heads group without KV groups (multi-head
    attention) and KV groups without a heads group keep multiples of ``tp``.

    Raises:
        BudgetError: No size of an attention that the options allow is shardable; names the group.

    """
    tp = opts.tensor_parallel
    if tp <= 1:
        return kept
    out = dict(kept)
    paired = {*pairs, *pairs.values()}
    for kv_id, h_id in pairs.items():
        if kv_id not in free and h_id not in free:
            continue
        kv, h = info.groups[kv_id], info.groups[h_id]
        want = (out.get(kv_id, kv.size), out.get(h_id, h.size))
        kvs = _choices(kv, opts) if kv_id in free else [kv.size]
        hs = _choices(h, opts) if h_id in free else [h.size]
        fits = [(a, b) for a in kvs if a % tp == 0 or tp % a == 0 for b in hs if (a * b) % tp == 0]
        pick = min(fits, key=lambda ab: _pair_cost(ab, want, (kv.size, h.size)), default=None)
        if pick is None:
            raise BudgetError(f"tensor_parallel={tp} (--tp): no size of attention '{kv.name}' ({kv.size} KV groups "
                              f"of {h.size} query heads) that round_to={opts.round_to} and min_keep={opts.min_keep:g} "
                              f"allow is shardable over {tp} ranks (KV groups a multiple or divisor of {tp}, query "
                              "heads a multiple of it)")
        for gid, value, old in ((kv_id, pick[0], want[0]), (h_id, pick[1], want[1])):
            if gid in free:
                out[gid] = value
                if bounds is not None and value != old:
                    bounds[gid] = f"tp={tp}"
    for gid in sorted(free - paired):
        g = info.groups[gid]
        if g.kind not in ("heads", "kv_groups"):
            continue
        asked = out.get(gid, g.size)
        sizes = [k for k in _choices(g, opts) if k % tp == 0]
        if not sizes:
            raise BudgetError(f"tensor_parallel={tp} (--tp): '{g.name}' has {g.size} {g.kind} and no size that "
                              f"round_to={opts.round_to} and min_keep={opts.min_keep:g} allow is a multiple of {tp}")
        count = min(sizes, key=_nearest(asked, g.size))
        out[gid] = count
        if bounds is not None and count != asked:
            bounds[gid] = f"tp={tp}"
    return out


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
    tp = (f", the sizes tensor_parallel={opts.tensor_parallel} (--tp) ranks shard"
          if opts.tensor_parallel > 1 else "")
    return BudgetError(f"{what} removes no channel{where}: {each} every channel "
                       f"after rounding to multiples of round_to={opts.round_to} (--round-to){tp} and the "
                       f"min_keep={opts.min_keep:g} floor (smallest group: {smallest} channels); ask for more or "
                       f"lower round_to{' or tp' if tp else ''}")


def plan_keep(
    graph: Any,
    info: DependencyInfo,
    scores: dict[int, np.ndarray],
    opts: ChannelOptions,
    exclude: set[int] | None = None,
    per_group: dict[int, float] | None = None,
    cost: Callable[[dict[int, int]], tuple[float, float]] | None = None,
    bounds: dict[int, str] | None = None,
) -> dict[int, np.ndarray]:
    """Choose the channels to keep in every group.

    ``per_group`` (from a budget allocator) gives each listed group its own ratio; other groups stay whole.
    Every count is planned under the rounding, the floor and ``tensor_parallel`` (a budget is met with the
    constrained sizes); ``bounds`` gets, per group, the constraint that moved its count.
    ``cost`` gives (parameters, FLOPs) when each group ``g`` keeps ``kept[g]`` channels, for the ``params`` and
    ``flops`` targets: by default the :class:`~secateurs.ir.cost.CostModel` of ``graph`` (a captured PyTorch
    graph or an ONNX one), so both dialects meet a budget the same way.

    Returns:
        Group id -> boolean keep mask, only for groups that lose channels.

    """
    exclude = exclude or set()
    if per_group is not None and opts.uniform:  # the allocator's split between kinds, the same in every layer
        per_group = uniform_ratios(per_group, [g for g in info.iter_groups() if g.id in per_group
                                               and g.id not in exclude and eligible(g, opts)])

    def ratio_of(g: ChannelGroup) -> float:
        return per_group.get(g.id, 0.0) if per_group is not None else opts.ratio_for(g.kind)

    groups = [g for g in info.iter_groups() if g.id not in exclude and eligible(g, opts) and ratio_of(g) > 0]
    if not groups:
        return {}
    order = {g.id: np.argsort(-scores[g.id], kind="stable") for g in groups}
    pairs = attention_pairs(info) if opts.tensor_parallel > 1 else {}
    free = {g.id for g in groups}

    def shard(kept: dict[int, int], bounds: dict[int, str] | None = None) -> dict[int, int]:
        return shard_attention(info, kept, free, opts, pairs, bounds)

    def masks_for(kept: dict[int, int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for g in groups:
            k = kept[g.id]
            if k < g.size:
                m = np.zeros(g.size, dtype=bool)
                m[order[g.id][:k]] = True
                out[g.id] = m
        return out

    def local(scale: float, bounds: dict[int, str] | None = None) -> dict[int, int]:
        """Every group loses ``scale`` x its kind's ratio (scale 1 for channel targets)."""
        return shard({g.id: round_keep(g, g.size - int(round(g.size * ratio_of(g) * scale)), opts, bounds)
                      for g in groups}, bounds)

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

    def global_(count: int, pool: list[tuple[float, int]] | None = None, bounds: dict[int, str] | None = None,
                sharded: bool = True) -> dict[int, int]:
        removed: dict[int, int] = {}
        for _, gid in (ranked if pool is None else pool)[:count]:
            removed[gid] = removed.get(gid, 0) + 1
        out = {g.id: round_keep(g, g.size - removed.get(g.id, 0), opts, bounds) for g in groups}
        return shard(out, bounds) if sharded else out

    if per_group is not None:
        return masks_for(local(1.0, bounds))
    if opts.target == "channels":
        if opts.scope == "local":
            return masks_for(local(1.0, bounds))
        kept: dict[int, int] = {}
        for kind, pool in by_kind.items():
            counts = global_(int(round(len(pool) * opts.ratio_for(kind))), pool, bounds, sharded=False)
            kept.update({gid: k for gid, k in counts.items() if info.groups[gid].kind == kind})
        return masks_for(shard(kept, bounds))

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
        best = local(hi, bounds)
    else:
        lo_i, hi_i = 0, len(ranked)
        while lo_i < hi_i:
            mid_i = (lo_i + hi_i) // 2
            if reached(global_(mid_i)):
                hi_i = mid_i
            else:
                lo_i = mid_i + 1
        best = global_(lo_i, bounds=bounds)
    if not reached(best):
        p, f = cost(best)
        got = 1 - (p / params0 if opts.target == "params" else f / max(flops0, 1.0))
        log.warning("target %s -%.0f%% not reachable with the floors; reached -%.1f%%", opts.target,
                    100 * opts.ratio, 100 * got)
    return masks_for(best)
