"""PruneChannels: width pruning of coupled channel groups, with a verified physical rewrite."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from secateurs.errors import BudgetError, CaptureError, VerificationError
from secateurs.frontends.derive import derive_capture
from secateurs.frontends.record import LAYOUT_ONLY
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.aten_cost import predict_cost
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo, FrozenGroup, require_kinds
from secateurs.ir.graph import Graph, RecordedProgram, is_dead, tensor_shape
from secateurs.modeling.rewrite import Snapshot, apply_keep, compensate_biases
from secateurs.passes.allocate import LayerBudget
from secateurs.passes.base import Pass, PassResult, Retry, transaction
from secateurs.passes.channel_plan import (
    KINDS,
    SCOPES,
    TARGETS,
    ChannelOptions,
    GroupChange,
    eligible,
    left_alone,
    plan_keep,
    require_removal,
    round_keep,
)
from secateurs.passes.importance import ChannelScores
from secateurs.passes.masked import (
    Disagreement,
    _mutates,
    adopted_nodes,
    checkpoints,
    masked_mismatch,
    masked_outputs,
    outputs_differ,
)

__all__ = ["KINDS", "SCOPES", "TARGETS", "ChannelOptions", "GroupChange", "PruneChannels", "PruneRecord", "eligible",
           "left_alone", "plan_keep", "require_removal", "round_keep"]

log = logging.getLogger(__name__)

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
    check: str = ""


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
    Python code contradicts (a hard-coded size, a stale attribute) is frozen and the pass asks the manager for a
    :class:`~secateurs.passes.base.Retry`: the manager restores the model and runs it again, which plans
    without the frozen groups (up to ``max_retries`` times). Guarantees: output shapes are unchanged and the
    graph is a capture of the rewritten module (derived from the dense one by the cheap check, ``derived`` set, or
    a fresh recording).
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
        self.max_retries = self.options.max_retries
        self._exclude: set[int] = set()  # groups frozen by earlier attempts of this run
        self._frozen: list[FrozenGroup] = []

    def run(self, graph: Graph) -> PassResult:
        """Plan, rewrite and verify on ``graph``; a contradiction freezes its groups and asks for a retry."""
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
        if self.attempt == 0:
            self._exclude, self._frozen = set(), [*info.frozen, *left_alone(info, opts)]
        exclude, frozen, attempt = self._exclude, self._frozen, self.attempt
        budget = graph.analyses.get(LayerBudget)
        per_group = budget.ratios if budget is not None else None
        if per_group is None and opts.require:
            require_kinds(info, opts.kind_ratios)
        bounds: dict[int, str] = {}
        keep = plan_keep(graph, info, scores, opts, exclude, per_group, bounds=bounds)
        if per_group is None and opts.require:
            require_removal(info, opts, keep, exclude, frozen)
        if not keep:
            return PassResult(graph, False, PruneRecord(opts, [], frozen, *predict_cost(graph, info, {}), attempt,
                                                        check="nothing to check: no channel removed"))
        kept_counts = {g: int(m.sum()) for g, m in keep.items()}
        predicted = predict_cost(graph, info, kept_counts)  # before the rewrite: it counts the module's params
        snap = transaction()  # the manager's, rolled back if anything after fails
        if opts.bias_compensation:
            compensated = compensate_biases(graph, info, keep, means, snap)
        overrides = _replaced_params(graph, snap)
        snap = apply_keep(graph, info, keep, snap)
        overrides = {**_replaced_params(graph, snap, unsliced=True), **overrides}
        if opts.check == "off":
            new_graph = self._recapture(graph, snap)
        else:
            checked, culprits, why = self._verify(graph, info, keep, kept_counts, snap, overrides)
            if checked is None:
                self._freeze(graph, info, culprits, why)
                raise Retry(why)
            new_graph = checked
        changes = [GroupChange(info.groups[g].name, info.groups[g].size, k, info.groups[g].kind,
                               bounds.get(g, ""))
                   for g, k in sorted(kept_counts.items())]
        how = "replay" if new_graph.derived else new_graph.capture
        return PassResult(new_graph, True, PruneRecord(opts, changes, frozen, *predicted, attempt, compensated,
                                                       check_line(opts.check, how)))

    def _method(self, graph: Graph) -> str:
        """How the rewritten model is captured again: as the dense one was, by torch.export under ``"full"``."""
        return "export" if self.options.check == "full" or graph.capture == "export" else "record"

    def _freeze(self, graph: Graph, info: DependencyInfo, culprits: set[int], why: str) -> None:
        """Leave ``culprits`` whole from the next attempt on (and the groups the same module code sizes)."""
        for gid in culprits:
            g = info.groups[gid]
            self._exclude.add(gid)
            self._frozen.append(FrozenGroup(g.size, tuple(sorted({m.name for m in g.members})), why))
        # the same module code contradicts the plan the same way in every instance: freeze those at once
        twins = same_code(graph.module, info, culprits, self._exclude)
        for gid, culprit in twins.items():
            g = info.groups[gid]
            self._exclude.add(gid)
            self._frozen.append(FrozenGroup(g.size, tuple(sorted({m.name for m in g.members})),
                                            f"same code as {info.groups[culprit].name}: {why}"))
        log.info("freezing %d group(s): %s", len(culprits) + len(twins), why)

    @staticmethod
    def _recapture(graph: Graph, snap: Snapshot) -> Graph:
        try:
            return capture_call(graph.module, graph.args, graph.kwargs, "export" if graph.capture == "export" else "auto")
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
        Under ``"fast"`` on a recorded graph the pruned forward is replayed against the dense recording and the
        outputs, with the nodes of :func:`~secateurs.passes.masked.checkpoints` and what adopted nodes read, are
        compared with the masked dense model's; anything else, or any doubt (the forward departs from the
        recording, a compared value differs), runs the per-node check, which also names the culprit.
        """
        fast = self._fast(graph, info, keep, kept, overrides)
        if fast is not None:
            return fast, set(), ""
        new, problem, partner = _shape_problem(graph, info, kept, self._method(graph))
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

    def _fast(self, graph: Graph, info: DependencyInfo, keep: dict[int, np.ndarray], kept: dict[int, int],
              overrides: dict[str, torch.Tensor] | None) -> Graph | None:
        """The cheap check: one replayed forward, its traced shapes against the plan, its outputs against the masked model.

        Returns the derived capture when all agree, else None (the caller checks node by node).
        """
        if self.options.check != "fast" or graph.capture != "record" or not isinstance(graph.program, RecordedProgram):
            return None
        # in a graph that writes into tensors, a later in-place op could change what the masked run reads
        copies: set[str] = set()
        if _mutates(graph.fx_graph):
            adopted = adopted_nodes(graph, info, keep)
            copies = adopted | checkpoints(graph) | {i.name for a in adopted for i in graph.node(a).all_input_nodes}
        try:
            derived = derive_capture(graph, copy=copies)
        except Exception as exc:  # the forward departs from the recording or fails: the full check says why
            log.debug("replaying the pruned model failed (%s); recording it", exc)
            return None
        new, memo = derived.graph, dict[int, int]()
        for name, node in derived.partner.items():
            old = graph.node(name)
            if not is_dead(old) and _compare_node(info, kept, memo, old, node) is not None:
                return None
        try:
            want = masked_outputs(graph, info, keep, new.values or {}, overrides, checkpoints(graph, derived.partner))
            why = outputs_differ(want, derived.outputs)
        except Disagreement as exc:
            why = str(exc)
        except Exception as exc:  # the masked run failed: the node-by-node check says where
            why = f"the masked dense run failed ({exc})"
        if why is not None:
            log.debug("cheap check: %s; checking node by node", why)
            return None
        new.values = None
        return new

    def _bisect(self, graph: Graph, info: DependencyInfo, keep: dict[int, np.ndarray], numeric: bool,
                among: list[int] | None = None) -> set[int]:
        """Find a smallest set of ``among`` (default all) groups whose pruning alone breaks the model.

        Breaking means a shape contradiction, or with ``numeric`` also a value contradiction (the masked check).
        """

        def fails(ids: list[int]) -> bool:
            sub = {g: keep[g] for g in ids}
            snap = apply_keep(graph, info, sub)
            try:
                new, problem, partner = _shape_problem(graph, info, {g: int(m.sum()) for g, m in sub.items()},
                                                       self._method(graph))
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


def check_line(check: str, capture: str) -> str:
    """What the verification of a width rewrite did, for the report."""
    if check == "off":
        return "not verified (verify='off'): the rewritten model was only captured again"
    if capture == "replay":
        return (f"{check}: one forward of the pruned model replayed against the dense recording, every traced shape "
                "against the plan and the outputs against the masked dense model")
    how = ("a recorded forward of the pruned model" if capture == "record"
           else "a torch.export capture of the pruned model")
    return (f"{check}: {how}, every traced shape against the plan and every value against the masked dense model")


def _shape_problem(
    graph: Graph, info: DependencyInfo, kept: dict[int, int], method: str = "record"
) -> tuple[Graph | None, tuple[str, list[int], str] | None, dict[str, fx.Node]]:
    """Capture the (already rewritten) module (``method``) and compare every traced shape with the prediction.

    Returns (new capture, None, partners) when they agree, else (capture or None, (node, atoms of the
    mismatching dims, description), partners); partners maps each dense node to the pruned node it lines up with.
    """
    partner: dict[str, fx.Node] = {}
    try:
        new = capture_call(graph.module, graph.args, graph.kwargs, method, keep_values=True)
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
            odd = [n for n in old_nodes[i1:i2] + new_nodes[j1:j2] if n.target not in LAYOUT_ONLY]
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
