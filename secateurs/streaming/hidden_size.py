"""The hidden size of a streamed model: find its group, score it block by block, choose the channels it keeps.

The group is found on the whole (depth-pruned) model captured on ``meta``; the blocks' members are scored while
the survey walks them, the tensors outside the blocks (embeddings, final norm, LM head) in row chunks at the end.
:class:`~secateurs.streaming.walker._Walker` calls these through its methods of the same names.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import capture
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.channels import round_keep
from secateurs.passes.criteria import WeightCriterion, channel_criterion
from secateurs.passes.dependencies import AnalyzeDependencies
from secateurs.passes.depth import RemoveBlocks
from secateurs.passes.importance import reduce_positions
from secateurs.streaming.blocks import _meta_model

if TYPE_CHECKING:
    from secateurs.streaming.walker import _Walker

__all__ = ["finish_hidden", "plan_hidden", "score_hidden"]


@dataclasses.dataclass
class _HiddenPlan:
    """The hidden-size group of the whole (meta) model, its members and the scores gathered block by block."""

    group: ChannelGroup
    members: list[tuple[str, int, np.ndarray, bool]]  # name, dim, channel of every flat index, is a parameter
    attrs: list[tuple[str, str, int]]  # module, attribute, size it takes once the group keeps ``keep``
    scores: np.ndarray
    table: Any
    keep: np.ndarray | None = None

    def cuts(self, prefix: str) -> tuple[list[tuple[str, int, np.ndarray]], list[tuple[str, str, int]]]:
        """The slices and attributes of the members under ``prefix``, named relative to it."""
        assert self.keep is not None
        cuts = [(name[len(prefix):], dim, np.flatnonzero((pos < 0) | np.isin(pos, self.keep)))
                for name, dim, pos, _ in self.members if name.startswith(prefix)]
        attrs = [(module[len(prefix):], attr, value) for module, attr, value in self.attrs
                 if (module + ".").startswith(prefix)]
        return cuts, attrs


def plan_hidden(walker: _Walker) -> None:
    """Find the hidden-size group: capture the whole (depth-pruned) model on ``meta`` and analyse it."""
    skeleton, _ = _meta_model(walker.folder)
    if walker.removed:
        RemoveBlocks(len(walker.removed))._apply(skeleton, walker.removed, Snapshot(), [])
    graph = capture(skeleton, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    AnalyzeDependencies()(graph)
    info = graph.analysis(DependencyInfo)
    groups = [g for g in info.iter_groups() if g.kind == "hidden"]
    embeddings = skeleton.get_input_embeddings()  # type: ignore[operator]
    emb = next((f"{n}.weight[1]" for n, m in skeleton.named_modules() if m is embeddings), "")
    why = next((f.reason for f in info.frozen if emb in f.members), None)
    if not groups and why is not None:
        raise BudgetError(f"the hidden size of {type(skeleton).__name__} is frozen (as it is in memory): {why}")
    if len(groups) != 1:
        raise BudgetError(f"{type(skeleton).__name__} has {len(groups)} hidden-size groups; streaming prunes "
                          "exactly one (the residual stream)")
    g = groups[0]
    members = [(m.name, m.dim, info.channel_positions(m, g.id), m.is_param) for m in g.members]
    outside = [n for n, _, _, _ in members if not n.startswith(walker.blocks_name + ".")]
    stream_dims = [pos for n, d, pos, _ in members if n in outside and d == 1]
    if any(not np.array_equal(pos, np.arange(g.size)) for pos in stream_dims):
        raise BudgetError(f"the hidden size of {type(skeleton).__name__} is not laid out channel by channel in "
                          "its embeddings; it cannot be streamed")
    state = {**graph.params, **graph.buffers}
    attrs = [(state[p].rpartition(".")[0], attr, atom) for p, attr, atom in info.module_attrs if p in state]
    walker.hidden = _HiddenPlan(g, members, attrs, np.zeros(g.size), info.table)  # type: ignore[arg-type]


def _hidden_criterion(walker: _Walker) -> WeightCriterion:
    scorer = channel_criterion(walker.opts.importance or "l2")
    assert isinstance(scorer, WeightCriterion)  # StreamOptions refuses the others for the hidden size
    return scorer


def _add_hidden(walker: _Walker, per: np.ndarray, positions: np.ndarray) -> None:
    plan = walker.hidden
    assert plan is not None
    maw = _hidden_criterion(walker).reduce == "max"
    red = reduce_positions(per, positions, plan.group.size, "max" if maw else "sum")
    plan.scores = np.maximum(plan.scores, red) if maw else plan.scores + red


def score_hidden(walker: _Walker, position: int, block: nn.Module) -> None:
    """Add the contributions of block ``position``'s hidden-size members (as :class:`ScoreChannels` does)."""
    assert walker.hidden is not None
    scorer = _hidden_criterion(walker)
    prefix = f"{walker.blocks_name}.{position}."
    for name, dim, pos, is_param in walker.hidden.members:
        if is_param and name.startswith(prefix):
            _add_hidden(walker, scorer.per_position(block.get_parameter(name[len(prefix):]), dim), pos)


def finish_hidden(walker: _Walker) -> None:
    """Add the embeddings', final norm's and LM head's contributions (read in row chunks); choose the channels."""
    plan = walker.hidden
    assert plan is not None
    scorer = _hidden_criterion(walker)
    maw = scorer.reduce == "max"
    for name, dim, pos, is_param in plan.members:
        if not is_param or name.startswith(walker.blocks_name + "."):
            continue
        stored = walker.stored_name(name)
        per: np.ndarray | None = None
        pieces = [walker.source.load([stored])[stored]] if dim == 0 else walker.source.chunks(stored,
                                                                                            walker.opts.chunk_bytes)
        for piece in pieces:
            walker.peak_weights = max(walker.peak_weights, piece.numel() * piece.element_size())
            p = scorer.per_position(piece, dim)
            per = p if per is None else (np.maximum(per, p) if maw else per + p)
        assert per is not None
        _add_hidden(walker, per, pos)
    scores = scorer.finish(plan.scores, plan.group.name)
    g = plan.group
    kept = round_keep(g, g.size - int(round(g.size * float(walker.opts.hidden or 0.0))), walker.options)
    if kept >= g.size:
        walker.hidden = None
        return
    plan.keep = np.sort(np.argsort(-scores, kind="stable")[:kept])
    memo: dict[int, int] = {}
    table = plan.table
    plan.attrs = [(module, attr, table.sized(atom, {g.id: kept}, memo)) for module, attr, atom in plan.attrs
                  if table.sized(atom, {g.id: kept}, memo) != table.sized(atom, {}, {})]

