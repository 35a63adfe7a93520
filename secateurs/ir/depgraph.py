"""Dependency analysis: run the op rule table over a captured graph and build coupled channel groups."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from torch import fx, nn

# Importing the table registers the ATen rules.
import secateurs.ir.aten_rules  # noqa: F401
from secateurs.errors import BudgetError
from secateurs.ir.atoms import AtomTable
from secateurs.ir.graph import Graph, tensor_shape
from secateurs.ir.rules import RULES, ConsumerUse, OpRuleTable, RuleContext

__all__ = ["FLAGS", "ChannelGroup", "DependencyInfo", "FrozenGroup", "Member", "analyze", "require_kinds"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Member:
    """One tensor dimension that a channel group slices.

    Attributes:
        placeholder: Graph placeholder of the parameter or buffer.
        name: Its name in the module (``layer1.0.conv1.weight``).
        dim: The sliced dimension.
        is_param: True for a parameter, False for a buffer.
        stride: Flat positions of this dim per channel of the group (``head_dim`` for a head group).
        numel_per_channel: Tensor elements removed from this member per channel removed.

    """

    placeholder: str
    name: str
    dim: int
    is_param: bool
    stride: int
    numel_per_channel: int = 0


@dataclasses.dataclass
class ChannelGroup:
    """A leaf channel group: channels removed together from every member dimension.

    Attributes:
        id: Leaf atom id (stable within one analysis).
        size: Number of channels.
        members: The parameter / buffer dims it slices.
        params_per_channel: Parameters removed per channel removed.
        mixed_at: Where the channels first enter a cross-channel statistic (LayerNorm / RMSNorm, a mean
            or softmax over channels), or None. Such groups (a transformer's hidden size) are pruned only
            on request, and pruning them is never exact.
        kind: The structure: ``heads`` (attention heads, or query heads within each KV group),
            ``kv_groups`` (a KV head with its query heads), ``ffn`` (neurons between linear layers: MLP /
            GLU widths), ``hidden`` (channels that enter a normalisation: a transformer's hidden size) or
            ``channels`` (anything else, e.g. conv channels).

    """

    id: int
    size: int
    members: tuple[Member, ...]
    params_per_channel: int
    mixed_at: str | None = None
    kind: str = "channels"

    @property
    def name(self) -> str:
        """Short readable name: the first parameter member, e.g. ``conv1.weight[0]``."""
        params = [m for m in self.members if m.is_param] or list(self.members)
        first = min(params, key=lambda m: (m.dim, m.stride))
        more = len({m.name for m in self.members}) - 1
        return f"{first.name}[{first.dim}]" + (f" (+{more})" if more else "")

    @property
    def min_keep(self) -> int:
        """Fewest channels the group may keep: one (a group is never removed whole by width pruning)."""
        return 1

    @property
    def stride(self) -> int:
        """Flat positions per channel in the member that holds the most weights per channel.

        A plain channel has stride 1; an attention head has stride ``head_dim`` in its q/k/v/o weights (a
        small per-head bias table does not count). Rounding kept sizes for tensor cores uses this.
        """
        best = max((m for m in self.members if m.is_param), key=lambda m: (m.numel_per_channel, -m.stride),
                   default=None)
        return best.stride if best is not None else 1

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides of the members holding at least a quarter of the most weights per channel.

        Rounding keeps every such sliced dim a multiple of ``round_to`` (a fused gate_up has stride 2, its down
        projection 1); small per-channel tables (a per-head bias) do not count.
        """
        params = [m for m in self.members if m.is_param]
        if not params:
            return (1,)
        most = max(m.numel_per_channel for m in params)
        return tuple(sorted({m.stride for m in params if 4 * m.numel_per_channel >= most}))

    def module_names(self) -> set[str]:
        """Names of the modules owning the members."""
        return {m.name.rsplit(".", 1)[0] if "." in m.name else "" for m in self.members}


@dataclasses.dataclass(frozen=True)
class FrozenGroup:
    """Channels that touch parameters but are never pruned, with the reason."""

    size: int
    members: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        """One report line."""
        names = ", ".join(self.members[:3]) + (f" (+{len(self.members) - 3})" if len(self.members) > 3 else "")
        return f"{names} x{self.size}: {self.reason}"


@dataclasses.dataclass
class DependencyInfo:
    """Result of :func:`analyze`: atoms of every value, prunable groups, frozen groups."""

    table: AtomTable
    values: dict[tuple[str, int], list[int]]
    groups: dict[int, ChannelGroup]
    frozen: list[FrozenGroup]
    consumers: list[ConsumerUse]
    module_attrs: list[tuple[str, str, int]]
    unsupported: list[str]
    mixing: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    rules: OpRuleTable | None = None  # the table the analysis ran with (None: the built-in RULES)

    def shape_under(self, value: tuple[str, int], kept: dict[int, int], memo: dict[int, int]) -> tuple[int, ...]:
        """Predicted shape of a graph value when each group ``g`` keeps ``kept[g]`` channels."""
        return tuple(self.table.sized(a, kept, memo) for a in self.values[value])

    def keep_mask(self, value: tuple[str, int], dim: int, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean mask of the kept flat indices of one value dim under per-group keep masks."""
        return self.table.keep_mask(self.values[value][dim], keep)

    def channel_positions(self, member: Member, group: int) -> np.ndarray:
        """For each flat index of a member dim, the channel of ``group`` it belongs to (-1: none)."""
        idx = self.table.coords(self.values[(member.placeholder, -1)][member.dim], group)
        assert idx is not None
        return idx

    def iter_groups(self) -> Iterator[ChannelGroup]:
        """Prunable groups in a stable order."""
        return iter(sorted(self.groups.values(), key=lambda g: g.id))


FLAGS = {"heads": "--heads", "kv_groups": "--kv-groups", "ffn": "--ffn", "hidden": "--hidden",
         "channels": "--channels"}
"""The command-line flag of each structure kind (error messages name both spellings)."""


def require_kinds(info: DependencyInfo, ratios: Iterable[tuple[str, float]]) -> None:
    """Refuse a per-structure ratio that selects no group of the model, naming the kinds the model has.

    Raises:
        BudgetError: A kind with a ratio above 0 has no prunable group in ``info``.

    """
    have: dict[str, int] = {}
    for g in info.iter_groups():
        have[g.kind] = have.get(g.kind, 0) + 1
    for kind, ratio in ratios:
        if ratio <= 0 or have.get(kind):
            continue
        listed = ", ".join(f"{k} x{n}" for k, n in sorted(have.items())) or "no prunable group at all"
        use = " / ".join(f"{k}= ({FLAGS[k]})" for k in sorted(have) if k in FLAGS)
        frozen = f"; {len(info.frozen)} groups are frozen (see `secateurs inspect`)" if info.frozen else ""
        raise BudgetError(f"{kind}={ratio:g} ({FLAGS.get(kind, kind)}) selects no group in this model (it has "
                          f"{listed}{frozen})" + (f"; use {use}" if use else ""))


def _value_keys(node: fx.Node) -> list[Any]:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return [(node, i) for i, v in enumerate(val) if tensor_shape(v) is not None]
    return [node] if tensor_shape(val) is not None else []


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _classify(
    group: ChannelGroup, tags: dict[int, set[str]], table: AtomTable, values: dict[tuple[str, int], list[int]],
    graph: Graph,
) -> str:
    """Name a group's structure from rule tags, normalisation and the kinds of modules it slices."""
    own = tags.get(group.id, set())
    if "heads" in own:
        # Under grouped-query attention a KV head shares a product with the copies (``repeat_kv``) or the
        # query heads (``enable_gqa``) of its group.
        for m in group.members:
            siblings = table.leaves(values[(m.placeholder, -1)][m.dim])
            if any(leaf != group.id and "copies" in tags.get(leaf, set()) for leaf in siblings):
                return "kv_groups"
        return "kv_groups" if "kv_groups" in own else "heads"
    if "kv_groups" in own:
        return "kv_groups"
    if group.mixed_at is not None:
        return "hidden"
    linear: list[int] = []  # strides of the members that are matrices of linear layers
    for m in group.members:
        if not m.is_param:
            continue
        if not m.name.endswith("weight") and graph.module.get_parameter(m.name).dim() == 3 and m.dim > 0:
            linear.append(m.stride)  # a stack of expert matrices (fused MoE experts' gate_up_proj / down_proj)
            continue
        if not m.name.endswith("weight"):
            continue
        path = m.name.rpartition(".")[0]
        if _is_linear(graph.module.get_submodule(path) if path else graph.module):
            linear.append(m.stride)
        elif graph.module.get_parameter(m.name).dim() != 1:
            return "channels"
    if len(linear) >= 2:
        # heads span head_dim rows in every projection; a fused gate_up has stride 2 but its down projection 1
        return "heads" if min(linear) > 1 else "ffn"
    return "channels"


def _apply_rule(ctx: RuleContext, node: fx.Node, rule: Any, keys: list[Any], unsupported: list[str]) -> bool:
    """Run one op rule; a rule that raises freezes what the node touches instead of ending the analysis.

    Whatever the rule recorded before it failed (consumers, size attributes) is dropped, and every input and
    output of the node is frozen with the rule's own message, so nothing it may have half-linked is pruned.
    Returns whether the rule succeeded.
    """
    consumers, attrs = len(ctx.consumers), len(ctx.module_attrs)
    try:
        rule(ctx, node)
    except Exception as exc:  # a rule bug or an unforeseen case must not crash the analysis: freeze and report
        del ctx.consumers[consumers:], ctx.module_attrs[attrs:]
        why = f"the op rule cannot handle this node ({type(exc).__name__}: {exc})"
        log.warning("%s at node '%s' (%s); its channels are frozen", why, node.name, node.target)
        unsupported.append(f"{node.name} ({node.target}): rule failed: {type(exc).__name__}: {exc}")
        for a in node.all_input_nodes:
            ctx.freeze_value(a, why)
        for key in keys:
            ctx.freeze_value(key, why)
        return False
    return True


def analyze(graph: Graph, rules: OpRuleTable | None = None) -> DependencyInfo:
    """Propagate channels through ``graph`` with the op rule table ``rules`` (default: :data:`RULES`).

    Graph inputs, graph outputs, constants, unknown ops and every dim whose size an op computes are frozen.

    Returns:
        The dependency information: prunable channel groups and frozen ones with reasons.

    """
    table = AtomTable()
    values: dict[tuple[str, int], list[int]] = {}
    ctx = RuleContext(table, values)
    unsupported: list[str] = []
    state = {**graph.params, **graph.buffers}
    ctx.weights = set(state) | set(graph.constants)
    ctx.root = graph.module
    tensors: dict[str, Any] = dict(graph.module.named_parameters(remove_duplicate=False))
    tensors.update(graph.module.named_buffers(remove_duplicate=False))
    first_of: dict[int, fx.Node] = {}
    for node in graph.nodes():
        ctx.node = node
        if node.op == "placeholder":
            if not ctx.is_tensor(node):
                continue
            ctx.dims(node)
            tensor = tensors.get(state.get(node.name, ""))
            if tensor is not None:
                # Tied parameters (an embedding shared with the LM head) are one tensor: prune them as one.
                twin = first_of.setdefault(id(tensor), node)
                if twin is not node:
                    ctx.same_dims(twin, node)
            if node.name in graph.constants:
                ctx.freeze_value(node, f"constant tensor '{graph.constants[node.name]}' cannot be sliced")
            elif node.name not in state:
                ctx.freeze_value(node, "graph input")
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            for i, o in enumerate(outs):
                if isinstance(o, fx.Node) and ctx.is_tensor(o):
                    ctx.freeze_value(o, f"graph output #{i}")
            continue
        if node.op != "call_function":
            for key in _value_keys(node):
                ctx.freeze_value(key, f"unsupported node kind {node.op}")
            continue
        keys = _value_keys(node)
        ctx.linked = set()
        for key in keys:
            ctx.dims(key)
        entry = (RULES if rules is None else rules).get(node.target)
        if entry is None:
            unsupported.append(f"{node.name} ({node.target})")
            for a in node.all_input_nodes:
                ctx.freeze_value(a, f"input of unsupported op {node.target}")
            for key in keys:
                ctx.freeze_value(key, f"output of unsupported op {node.target}")
            continue
        if not _apply_rule(ctx, node, entry.rule, keys, unsupported):
            continue
        for key in keys:
            unlinked = [a for a in ctx.dims(key) if a not in ctx.linked and table.size(a) > 1]
            if unlinked:
                ctx.freeze(unlinked, "size computed by the op", channel=False)
    ctx.node = None
    for name in state:
        for d, atom in enumerate(values.get((name, -1), [])):
            if atom not in ctx.ever_linked and table.size(atom) > 1:
                table.freeze(
                    atom, f"dim {d} of '{state[name]}' is not a channel dim of any op that uses it", channel=False
                )
    frozen_leaves = table.frozen_leaves()
    mixed = table.mixed_leaves()
    tags = table.tagged_leaves()
    members: dict[int, list[Member]] = {}
    for name, fqn in state.items():
        node_atoms = values.get((name, -1))
        if node_atoms is None:
            continue
        for d, atom in enumerate(node_atoms):
            for leaf in table.leaves(atom):
                if table.size(leaf) <= 1:
                    continue
                stride = table.others_in_product(atom, leaf)
                shp = tensor_shape(graph.node(name).meta.get("val")) or (1,)
                per = math.prod(shp) // max(shp[d], 1) * stride
                members.setdefault(leaf, []).append(Member(name, fqn, d, name in graph.params, stride, per))
    groups: dict[int, ChannelGroup] = {}
    frozen: list[FrozenGroup] = []
    for leaf, mem in members.items():
        if not any(m.is_param for m in mem):
            continue
        size = table.size(leaf)
        if leaf in frozen_leaves:
            reason, is_channel = frozen_leaves[leaf]
            if is_channel is not False:
                frozen.append(FrozenGroup(size, tuple(sorted({f"{m.name}[{m.dim}]" for m in mem})), reason))
            continue
        per = sum(m.numel_per_channel for m in mem if m.is_param)
        group = ChannelGroup(leaf, size, tuple(mem), per, mixed.get(leaf))
        group.kind = _classify(group, tags, table, values, graph)
        groups[leaf] = group
    log.debug("analysis: %d groups, %d frozen, %d unsupported ops", len(groups), len(frozen), len(unsupported))
    return DependencyInfo(table, values, groups, frozen, ctx.consumers, ctx.module_attrs, unsupported, ctx.mixing,
                          rules)
