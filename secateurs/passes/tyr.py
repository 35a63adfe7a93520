"""Týr-the-Pruner's allocation search for width budgets: candidates per group, measured losses, a knapsack.

After "Týr-the-Pruner: Structural Pruning of LLMs by Global Sparsity Distribution Optimization" (2025), on
secateurs' channel groups and without its supernet of re-fitted layers:

* **Candidates.** Every group (an attention's heads, an FFN, a conv's channels) is considered at several
  ratios around its current one: a coarse grid first (``+-0.2``, ``+-0.1``), then a finer one around the
  choice (``+-0.05``, ``+-0.025``). A candidate removes the group's lowest-scored channels (the width
  criterion's scores), applied by zeroing every parameter slice of those channels, with the bias
  compensation the pruning pass will apply (FLAP's: each consumer's bias takes the calibration mean of its
  removed inputs) folded in, so a candidate is measured as it will be pruned.
* **Expectation-error accumulation.** A candidate's effect is measured with every other group already pruned
  at its current ratio, so its error is the one it adds to what the earlier (and later) layers have
  already done: the increase of the loss ``L`` (the masked model's distance to the dense outputs on the
  calibration batches: KL of the next-token distributions for logits, else relative squared error).
* **Search.** A knapsack (dynamic programming) picks one candidate per group with the least summed loss
  increase that removes at least the budget (per structure kind when each has its own); the choice, shifted
  by one constant onto the budget exactly, is measured and becomes the next round's current ratios. The
  result is the best allocation measured, the uniform one included.

:class:`TyrSearch` records the rounds (the estimated loss of each round's choice), the measured loss of the
final allocation against the uniform one, the per-group ratios, the number of model evaluations and the time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import BudgetError
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo
from secateurs.passes.hooks import Call
from secateurs.passes.unipruning import masked_distance

__all__ = ["COARSE_TO_FINE", "TyrSearch", "search_ratios"]

COARSE_TO_FINE = ((-0.2, -0.1, 0.1, 0.2), (-0.05, -0.025, 0.025, 0.05))
"""The candidate offsets from each group's current ratio, one tuple per round."""


@dataclasses.dataclass(frozen=True)
class TyrSearch:
    """What the Týr search did.

    Attributes:
        rounds: Per round, the loss its choice was estimated to reach (the round's measured base plus the
            summed increases of the chosen candidates).
        uniform_loss: The loss with every group at the uniform ratio.
        estimated_loss: The last round's estimate.
        measured_loss: The loss of the final allocation, measured: the best of the uniform one and each round's
            choice (shifted onto the budget exactly).
        choices: ``(group name, ratio)`` per group.
        evaluations: Forward passes over the calibration batches.
        seconds: Wall time.

    """

    rounds: tuple[float, ...]
    uniform_loss: float
    estimated_loss: float
    measured_loss: float
    choices: tuple[tuple[str, float], ...]
    evaluations: int
    seconds: float


class _Masker:
    """The model's parameters with some groups' lowest-scored channels zeroed (applied functionally)."""

    def __init__(self, model: nn.Module, info: DependencyInfo, groups: Sequence[ChannelGroup],
                 scores: dict[int, np.ndarray]) -> None:
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.groups = groups
        self.order = {g.id: np.argsort(np.asarray(scores[g.id], dtype=np.float64), kind="stable") for g in groups}
        self.positions = {(g.id, m.name, m.dim): torch.from_numpy(np.array(info.channel_positions(m, g.id)))
                          for g in groups for m in g.members if m.is_param and m.name in self.params}

    def keep(self, counts: dict[int, int]) -> dict[int, np.ndarray]:
        """Per group, its keep mask over channels with its ``counts[g]`` lowest-scored channels removed."""
        out = {}
        for g in self.groups:
            mask = np.ones(g.size, dtype=bool)
            mask[self.order[g.id][:counts.get(g.id, 0)]] = False
            out[g.id] = mask
        return out

    def weights(self, counts: dict[int, int]) -> dict[str, torch.Tensor]:
        """Parameters with ``counts[g]`` lowest-scored channels of every group zeroed (only those it changes)."""
        keep: dict[str, torch.Tensor] = {}
        for g in self.groups:
            k = counts.get(g.id, 0)
            if k <= 0:
                continue
            removed = torch.from_numpy(self.order[g.id][:k])
            for m in g.members:
                pos = self.positions.get((g.id, m.name, m.dim))
                if pos is None:
                    continue
                p = self.params[m.name]
                hit = torch.isin(pos, removed)  # positions of the removed channels along the member's dim
                shape = [1] * p.dim()
                shape[m.dim] = -1
                mask = (~hit).view(shape).expand_as(p)
                keep[m.name] = keep[m.name] & mask if m.name in keep else mask
        # read each parameter now: a compensation replaces bias parameters
        current = {name: self.model.get_parameter(name).detach() for name in keep}
        return {name: current[name] * mask.to(current[name].dtype) for name, mask in keep.items()}


def search_ratios(model: nn.Module, info: DependencyInfo, groups: Sequence[ChannelGroup],
                  scores: dict[int, np.ndarray], calls: Sequence[Call], budgets: Sequence[tuple[list[int], float]],
                  *, weights: dict[int, float], cap: Callable[[ChannelGroup], float],
                  knapsack: Callable[[list[Any], list[list[tuple[float, int]]], float], dict[int, float]],
                  recentre: Callable[[list[Any], np.ndarray, float], dict[int, float]],
                  compensate: Callable[[dict[int, np.ndarray]], Callable[[], None]] | None = None,
                  rounds: Sequence[Sequence[float]] = COARSE_TO_FINE) -> tuple[dict[int, float], TyrSearch]:
    """Per-group ratios by the search of the module docstring.

    Args:
        model: The dense model (left unchanged: candidates are applied functionally).
        info: Its dependency analysis.
        groups: The groups sharing the budgets.
        scores: Channel scores per group id (lowest removed first).
        calls: This rank's calibration calls.
        budgets: ``(indices into groups, ratio)`` per budget (one, or one per structure kind).
        weights: What one channel of each group is worth in the budget's unit.
        cap: The largest ratio of a group (its floor).
        knapsack: The allocator's DP: ``(groups, options (loss, channels) per group, ratio) -> ratios``.
        recentre: The allocator's exact budget shift: ``(groups, ratios, ratio) -> ratios``.
        compensate: When the pruning pass compensates biases: applies that compensation for per-group keep masks
            (in place) and returns what undoes it.
        rounds: Candidate offsets per round.

    Returns:
        The ratio per group id, and the record of the search.

    """
    start = time.perf_counter()
    masker = _Masker(model, info, groups, scores)
    evaluations = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            teacher = [model(*args, **kwargs) for args, kwargs in calls]

        def loss(counts: dict[int, int]) -> float:
            nonlocal evaluations
            evaluations += 1
            undo = None
            try:
                undo = compensate(masker.keep(counts)) if compensate is not None else None
                # the weights after the compensation: a compensated bias may also be zeroed
                return masked_distance(model, masker.weights(counts), calls, teacher)
            finally:
                if undo is not None:
                    undo()

        top = {g.id: int(g.size * cap(g) + 1e-9) for g in groups}

        def whole(sub: list[ChannelGroup], ratios: dict[int, float], ratio: float) -> dict[int, int]:
            # whole channels per group for ``ratios``: rounded down, then the largest remainders (and any group
            # with room) get one more until the budget is spent; every compared allocation spends it so
            need = ratio * sum(weights[g.id] * g.size for g in sub) - 1e-9
            counts = {g.id: min(int(g.size * ratios[g.id] + 1e-9), top[g.id]) for g in sub}
            spent = sum(weights[g.id] * counts[g.id] for g in sub)
            order = sorted(sub, key=lambda g: -(g.size * ratios[g.id] - counts[g.id]))
            while spent < need:
                grew = False
                for g in order:
                    if counts[g.id] < top[g.id] and spent < need:
                        counts[g.id] += 1
                        spent += weights[g.id]
                        grew = True
                if not grew:
                    raise BudgetError(f"the {ratio:.0%} budget cannot be met within the per-group floors")
            return counts

        current: dict[int, int] = {g.id: 0 for g in groups}
        for idx, ratio in budgets:
            sub = [groups[i] for i in idx]
            current.update(whole(sub, {g.id: min(ratio, cap(g)) for g in sub}, ratio))
        uniform = base = loss(current)
        best, best_loss = dict(current), uniform
        estimates = []
        for offsets in rounds:
            options: dict[int, list[tuple[float, int]]] = {}
            for g in groups:
                here = current[g.id]
                opts = {here: 0.0}
                near = {here - 1, here + 1} | {int(round(here + d * g.size)) for d in offsets}  # whole neighbours too
                for k in sorted(k for k in near if 0 <= k <= top[g.id] and k != here):
                    opts[k] = loss({**current, g.id: k}) - base
                options[g.id] = sorted((cost, k) for k, cost in opts.items())
            estimate = base
            chosen = dict(current)
            for idx, ratio in budgets:
                sub = [groups[i] for i in idx]
                try:
                    picked = knapsack(sub, [options[g.id] for g in sub], ratio)
                except BudgetError:  # the knapsack's bins could not meet this budget with these candidates
                    continue
                estimate += sum(dict((k, c) for c, k in options[g.id])[int(round(g.size * picked[g.id]))]
                                for g in sub)
                # shifted onto the budget, then back to whole channels that spend it
                shifted = recentre(sub, np.asarray([picked[g.id] for g in sub]), ratio)
                chosen.update(whole(sub, shifted, ratio))
            estimates.append(estimate)
            if chosen == current:
                continue
            current = chosen
            base = loss(current)
            if base < best_loss:  # the search keeps the best allocation it measured (the uniform one included)
                best, best_loss = dict(current), base
        final = {g.id: best[g.id] / g.size for g in groups}
        measured = best_loss
    finally:
        model.train(was_training)
    record = TyrSearch(tuple(estimates), uniform, estimates[-1] if estimates else uniform, measured,
                       tuple((g.name, final.get(g.id, 0.0)) for g in groups), evaluations,
                       time.perf_counter() - start)
    return final, record
