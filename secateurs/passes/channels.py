"""PruneChannels: width pruning of coupled channel groups, with a verified physical rewrite."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from secateurs.errors import BudgetError, CaptureError, VerificationError
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.aten_cost import predict_cost
from secateurs.ir.depgraph import FLAGS, ChannelGroup, DependencyInfo, FrozenGroup, require_kinds
from secateurs.ir.graph import Graph, is_dead, tensor_shape
from secateurs.modeling.rewrite import Snapshot, apply_keep, compensate_biases
from secateurs.passes.allocate import LayerBudget
from secateurs.passes.base import Pass, PassResult, cost_model, transaction
from secateurs.passes.importance import ChannelScores
from secateurs.passes.masked import masked_mismatch

__all__ = ["ChannelOptions", "GroupChange", "PruneChannels", "PruneRecord", "eligible", "left_alone", "plan_keep",
           "require_removal", "round_keep"]

log = logging.getLogger(__name__)

TARGETS = ("channels", "params", "flops")
KINDS = ("heads", "kv_groups", "ffn", "hidden", "channels")
SCOPES = ("local", "global")


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
        verify: Re-capture the rewritten model and check every traced shape against the plan.
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
    verify: bool = True
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
        if self.kind_ratios and self.target != "channels":
            raise BudgetError("per-structure ratios (heads=, ffn=, ...) work with target='channels' only")

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


@dataclasses.dataclass
class PruneRecord:
    """What :class:`PruneChannels` did."""

    options: ChannelOptions
    changes: list[GroupChange]
    frozen: list[FrozenGroup]
    predicted_params: int
    predicted_flops: float
    retries: int = 0
    compensated: tuple[int, int] = (0, 0)


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
        smallest = min(g.size for g in selected)
        raise BudgetError(f"{what} removes no channel: each of its {len(selected)} groups keeps every channel "
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


def cost_as_predicted(before: Graph, result: PassResult) -> list[str]:
    """The rewritten model has the parameters the plan predicted (what budgets and allocators counted)."""
    record = result.record
    if not isinstance(record, PruneRecord):
        return []
    measured = result.graph.param_count()
    if measured != record.predicted_params:
        return [f"the plan predicted {record.predicted_params:,} parameters, the rewritten model has {measured:,}"]
    return []


class PruneChannels(Pass):
    """Transform pass: remove the least important channels of every group and rewrite the module.

    Requires :class:`DependencyInfo` and :class:`ChannelScores`; follows a :class:`LayerBudget` when an
    allocator pass wrote one (per-group ratios instead of ``ratio``). After slicing, the model is captured again
    and every traced shape is compared with the plan's prediction; a group whose pruning the model's own
    Python code contradicts (a hard-coded size, a stale attribute) is frozen, the model restored and the plan
    redone. Guarantees: output shapes are unchanged and the graph is a fresh capture of the rewritten module.
    """

    requires = (DependencyInfo, ChannelScores)
    transforms = True
    transactional = True
    ensures = (cost_as_predicted,)

    def __init__(self, options: ChannelOptions | None = None, **kwargs: object) -> None:
        """Create the pass from a :class:`ChannelOptions` or its fields as keywords."""
        if options is not None and kwargs:
            raise BudgetError("pass either options or keyword options, not both")
        self.options = options or ChannelOptions(**kwargs)  # type: ignore[arg-type]

    def run(self, graph: Graph) -> PassResult:
        """Plan, rewrite, verify (and retry) on ``graph``."""
        info = graph.analysis(DependencyInfo)
        scored = graph.analysis(ChannelScores)
        scores = scored.scores
        opts = self.options
        if opts.bias_compensation is None:  # FLAP's own default: compensate what flap scores removed
            opts = dataclasses.replace(opts, bias_compensation=scored.criterion == "flap" and bool(scored.inputs))
        if opts.bias_compensation and not scored.inputs:
            raise BudgetError("bias compensation needs calibration statistics: use importance 'flap' or 'activation'")
        means = {k: v.mean for k, v in scored.inputs.items()}
        compensated = (0, 0)
        exclude: set[int] = set()
        frozen = [*info.frozen, *left_alone(info, opts)]
        budget = graph.analyses.get(LayerBudget)
        per_group = budget.ratios if budget is not None else None
        if per_group is None and opts.require:
            require_kinds(info, opts.kind_ratios)
        for attempt in range(opts.max_retries + 1):
            keep = plan_keep(graph, info, scores, opts, exclude, per_group)
            if per_group is None and opts.require:
                require_removal(info, opts, keep, exclude, frozen)
            if not keep:
                return PassResult(graph, False, PruneRecord(opts, [], frozen, *predict_cost(graph, info, {}), attempt))
            kept_counts = {g: int(m.sum()) for g, m in keep.items()}
            predicted = predict_cost(graph, info, kept_counts)  # before the rewrite: it counts the module's params
            snap = transaction()  # the manager's, rolled back if anything after fails
            if opts.bias_compensation:
                compensated = compensate_biases(graph, info, keep, means, snap)
            overrides = _replaced_params(graph, snap)
            snap = apply_keep(graph, info, keep, snap)
            overrides = {**_replaced_params(graph, snap, unsliced=True), **overrides}
            if not opts.verify:
                new_graph = self._recapture(graph, snap)
                break
            checked, culprits, why = self._verify(graph, info, keep, kept_counts, snap, overrides)
            if checked is not None:
                new_graph = checked
                break
            for gid in culprits:
                g = info.groups[gid]
                exclude.add(gid)
                frozen.append(FrozenGroup(g.size, tuple(sorted({m.name for m in g.members})), why))
            # the same module code contradicts the plan the same way in every instance: freeze those at once
            twins = same_code(graph.module, info, culprits, exclude)
            for gid, culprit in twins.items():
                g = info.groups[gid]
                exclude.add(gid)
                frozen.append(FrozenGroup(g.size, tuple(sorted({m.name for m in g.members})),
                                          f"same code as {info.groups[culprit].name}: {why}"))
            log.info("freezing %d group(s): %s", len(culprits) + len(twins), why)
        else:
            raise VerificationError(
                f"the rewritten model kept contradicting the plan after {opts.max_retries} retries; "
                "the model was restored"
            )
        changes = [GroupChange(info.groups[g].name, info.groups[g].size, k, info.groups[g].kind)
                   for g, k in sorted(kept_counts.items())]
        return PassResult(new_graph, True, PruneRecord(opts, changes, frozen, *predicted, attempt, compensated))

    @staticmethod
    def _recapture(graph: Graph, snap: Snapshot) -> Graph:
        try:
            return capture_call(graph.module, graph.args, graph.kwargs)
        except CaptureError as exc:
            snap.restore()
            raise VerificationError(f"the pruned model no longer captures; it was restored: {exc}") from exc

    def _verify(
        self,
        graph: Graph,
        info: DependencyInfo,
        keep: dict[int, np.ndarray],
        kept: dict[int, int],
        snap: Snapshot,
        overrides: dict[str, torch.Tensor] | None = None,
    ) -> tuple[Graph | None, set[int], str]:
        """Check the rewritten model against the plan: every traced shape, then every value (masked check).

        Returns the new capture when it agrees; otherwise restores the model and names the culprit groups.
        """
        new, problem, partner = _shape_problem(graph, info, kept)
        if problem is None:
            assert new is not None
            mismatch = masked_mismatch(graph, new, info, keep, partner, overrides)
            if mismatch is None:
                return new, set(), ""
            problem = (mismatch.node, list(mismatch.atoms), mismatch.detail)
            why, numeric = mismatch.detail, True
        else:
            numeric = False
            why = f"the model's code disagrees with pruning it ({problem[2]}); a size is probably hard-coded"
        snap.restore()
        culprits: set[int] = set()
        for atom in problem[1]:
            culprits.update(leaf for leaf in info.table.leaves(atom) if leaf in keep)
        if not culprits or (numeric and len(culprits) > 1):
            # A value mismatch names the node, not which of the groups it reads is to blame (pruning channels
            # after a literal range is harmless, before it is not): narrow down among them.
            culprits = self._bisect(graph, info, keep, numeric, sorted(culprits) or None)
        return None, culprits, why

    def _bisect(self, graph: Graph, info: DependencyInfo, keep: dict[int, np.ndarray], numeric: bool,
                among: list[int] | None = None) -> set[int]:
        """Find a smallest set of ``among`` (default all) groups whose pruning alone breaks the model.

        Breaking means a shape contradiction, or with ``numeric`` also a value contradiction (the masked check).
        """

        def fails(ids: list[int]) -> bool:
            sub = {g: keep[g] for g in ids}
            snap = apply_keep(graph, info, sub)
            try:
                new, problem, partner = _shape_problem(graph, info, {g: int(m.sum()) for g, m in sub.items()})
                if problem is not None or not numeric:
                    return problem is not None
                assert new is not None
                # scales that follow a pruned size (Gemma's embed_scale) are the plan's meaning here too
                overrides = _replaced_params(graph, snap, unsliced=True)
                return masked_mismatch(graph, new, info, sub, partner, overrides) is not None
            finally:
                snap.restore()

        ids = among if among is not None else sorted(keep)
        while len(ids) > 1:
            half, rest = ids[: len(ids) // 2], ids[len(ids) // 2:]
            if fails(half):
                ids = half
            elif fails(rest):
                ids = rest
            else:
                break
        return set(ids)


def _code_site(model: nn.Module, group: ChannelGroup) -> tuple[str, tuple[Any, ...]]:
    """Where the model's code decides a group's sizes: the smallest module holding all its members (its path).

    With it: the group's kind, that module's class, and the members' names and dims relative to it.
    """
    paths = [m.name.split(".")[:-1] for m in group.members]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    path = ".".join(common)
    owner = model.get_submodule(path) if path else model
    prefix = len(path) + 1 if path else 0
    return path, (group.kind, type(owner), tuple(sorted({(m.name[prefix:], m.dim) for m in group.members})))


def same_code(model: nn.Module, info: DependencyInfo, culprits: set[int], exclude: set[int]) -> dict[int, int]:
    """Groups (not yet excluded) of other instances of a culprit's module, sized by the same code.

    Returns group id -> that culprit. Other groups of the culprit's own module (another segment of the same
    tensor) are not twins: the plan may be wrong about one segment only.
    """
    sites: dict[tuple[Any, ...], tuple[int, str]] = {}
    for c in sorted(culprits):
        path, site = _code_site(model, info.groups[c])
        sites.setdefault(site, (c, path))
    out: dict[int, int] = {}
    for g in info.iter_groups():
        if g.id in exclude:
            continue
        path, site = _code_site(model, g)
        hit = sites.get(site)
        if hit is not None and hit[1] != path:
            out[g.id] = hit[0]
    return out


def _replaced_params(graph: Graph, snap: Snapshot, unsliced: bool = False) -> dict[str, torch.Tensor]:
    """Name -> current tensor of every parameter / buffer ``snap`` replaced.

    These are compensated biases and scales that follow a pruned size; with ``unsliced`` only the tensors whose
    shape did not change.
    """
    names = {id(m): n for n, m in graph.module.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for owner, kind, name, old in snap.entries:
        if kind not in ("param", "buffer") or id(owner) not in names:
            continue
        current = (owner._parameters if kind == "param" else owner._buffers).get(name)
        if current is None or (unsliced and (old is None or tuple(old.shape) != tuple(current.shape))):
            continue
        prefix = names[id(owner)]
        out.setdefault(f"{prefix}.{name}" if prefix else name, current.detach())
    return out


def _shape_problem(
    graph: Graph, info: DependencyInfo, kept: dict[int, int]
) -> tuple[Graph | None, tuple[str, list[int], str] | None, dict[str, fx.Node]]:
    """Capture the (already rewritten) module and compare every traced shape with the prediction.

    Returns (new capture, None, partners) when they agree, else (capture or None, (node, atoms of the
    mismatching dims, description), partners); partners maps each dense node to the pruned node it lines up with.
    """
    partner: dict[str, fx.Node] = {}
    try:
        new = capture_call(graph.module, graph.args, graph.kwargs)
    except CaptureError as exc:
        return None, ("<capture>", [], str(exc).splitlines()[0]), partner
    old_nodes = [n for n in graph.nodes() if n.op in ("placeholder", "call_function")]
    new_nodes = [n for n in new.nodes() if n.op in ("placeholder", "call_function")]
    memo: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(
        None, [str(n.target) for n in old_nodes], [str(n.target) for n in new_nodes], autojunk=False
    )
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            # Code paths may legitimately drop or add layout-only ops (``repeat_kv`` disappears when a KV group
            # keeps one query head); anything that computes must line up.
            odd = [n for n in old_nodes[i1:i2] + new_nodes[j1:j2] if n.target not in _LAYOUT_ONLY]
            if odd:
                return new, (odd[0].name, [], f"the traced graph changed structure at node '{odd[0].name}'"), partner
            continue
        for old, new_node in zip(old_nodes[i1:i2], new_nodes[j1:j2], strict=True):
            partner[old.name] = new_node
            if is_dead(old):  # a value nothing reads (a cache export left behind) cannot change the outputs
                continue
            problem = _compare_node(info, kept, memo, old, new_node)
            if problem is not None:
                return new, problem, partner
    return new, None, partner


_LAYOUT_ONLY = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
    torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
    torch.ops.aten._assert_tensor_metadata.default,
}


def _compare_node(
    info: DependencyInfo, kept: dict[int, int], memo: dict[int, int], old: fx.Node, new: fx.Node
) -> tuple[str, list[int], str] | None:
    new_val, old_val = new.meta.get("val"), old.meta.get("val")
    multi = isinstance(old_val, (list, tuple)) and isinstance(new_val, (list, tuple))
    pairs = list(zip(new_val, old_val, strict=False)) if multi else [(new_val, old_val)]  # type: ignore[arg-type]
    for k, (nv, ov) in enumerate(pairs):
        if tensor_shape(ov) is None:
            continue
        key = (old.name, k if multi else -1)
        if key not in info.values:
            continue
        want = info.shape_under(key, kept, memo)
        got = tensor_shape(nv)
        if got != want:
            bad = [a for d, a in enumerate(info.values[key]) if got is None or d >= len(got) or got[d] != want[d]]
            return (old.name, bad, f"node '{old.name}' ({old.target}) traced {got}, plan says {want}")
    return None
