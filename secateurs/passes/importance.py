"""ScoreChannels: importance of every channel of every group.

Criteria:
    ``l1`` / ``l2``: magnitude of all the weights a channel owns across the group (sum of |w|, root of sum
    of w^2). ``maw``: maximum absolute weight (the GLU width-pruning criterion). ``taylor``: first-order
    Taylor, sum of |w * dL/dw| over calibration batches. ``activation``: Wanda / FLAP style,
    RMS of the input activation of each consumer (linear / conv) times the norm of that consumer's weight
    column; groups with no consumer fall back to ``l2``. A callable ``(graph, info, group) -> scores`` is
    also accepted.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.distributed import all_reduce_sum, shard
from secateurs.errors import BudgetError
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo
from secateurs.ir.graph import Graph
from secateurs.passes.base import Pass, PassResult
from secateurs.passes.criteria import (
    L2,
    WeightCriterion,
    _reduced,
    channel_criterion,
    criteria_names,
    reduce_positions,
)
from secateurs.passes.hooks import calibration_calls, run_calibration
from secateurs.progress import track

__all__ = ["CRITERIA", "ChannelScores", "InputStats", "ScoreChannels", "default_loss", "reduce_positions"]

log = logging.getLogger(__name__)

CRITERIA = criteria_names()  # every registered criterion (secateurs.passes.criteria)
Criterion = str | Callable[[Graph, DependencyInfo, ChannelGroup], np.ndarray]
LossFn = Callable[[Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class InputStats:
    """Per-channel statistics of a consumer's input over the calibration tokens."""

    mean: np.ndarray
    var: np.ndarray

    @property
    def rms(self) -> np.ndarray:
        """Root mean square per channel."""
        return np.sqrt(np.maximum(self.var + self.mean**2, 0.0))


@dataclasses.dataclass
class ChannelScores:
    """Per-group channel importances (higher = more important).

    Attributes:
        criterion: The criterion's name.
        scores: Group id -> one score per channel.
        fallback: Groups scored by ``l2`` because the criterion had no statistics for them.
        inputs: Consumer input statistics keyed by (weight placeholder, weight dim), for ``activation`` and
            ``flap``; bias compensation reads the means.

    """

    criterion: str
    scores: dict[int, np.ndarray]
    fallback: tuple[int, ...] = ()
    inputs: dict[tuple[str, int], InputStats] = dataclasses.field(default_factory=dict)


def _per_position(t: torch.Tensor, dim: int, how: str) -> np.ndarray:
    return _reduced(t, dim, {"l1": "abs_sum", "l2": "sq_sum"}.get(how, "abs_max"))


def default_loss(output: Any) -> torch.Tensor:
    """The model's own ``loss`` when it returned one, else half the mean square of its float outputs."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss  # Hugging Face computed its task / language-modelling loss (labels were passed)
    leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise BudgetError("taylor importance needs a floating-point model output or a loss_fn")
    return sum(0.5 * t.float().pow(2).mean() for t in leaves)  # type: ignore[return-value]


class ScoreChannels(Pass):
    """Analysis pass: score every channel of every prunable group; attaches :class:`ChannelScores`."""

    requires = (DependencyInfo,)
    provides = (ChannelScores,)

    def __init__(
        self,
        criterion: Criterion | None = None,
        *,
        calib: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        group_prefix: str = "",
    ) -> None:
        """Create the pass.

        Args:
            criterion: One of :data:`CRITERIA` or a callable ``(graph, info, group) -> scores``. Default:
                ``"flap"`` when ``calib`` is given, else ``"l2"`` (what :func:`secateurs.prune` chooses).
            calib: Calibration batches (each a tuple of positional inputs or a dict of keyword inputs) for
                ``taylor`` and ``activation``; defaults to the capture's example inputs. Under ``torchrun``
                each rank runs its share and the statistics are summed over the ranks
                (:mod:`secateurs.distributed`).
            loss_fn: Loss on the model output for ``taylor``. By default a Hugging Face model that takes
                ``labels`` gets ``labels=input_ids`` (its language-modelling loss, as in LLM-Pruner) or uses
                the ``loss`` it returns; otherwise half the mean square of the floating-point outputs.
            group_prefix: Put before every group's name where a criterion reads it (``random`` seeds with it):
                the streamed path scores a block captured alone under the whole model's names.

        """
        if criterion is None:
            criterion = "flap" if calib is not None else "l2"
        if not callable(criterion):
            channel_criterion(criterion)  # a name the registry does not hold is refused here
        self.criterion = criterion
        self.calib = calib
        self.loss_fn = loss_fn
        self.group_prefix = group_prefix

    def run(self, graph: Graph) -> PassResult:
        """Score every group of the dependency analysis."""
        info = graph.analysis(DependencyInfo)
        module = graph.module
        scores: dict[int, np.ndarray] = {}
        fallback: list[int] = []
        if callable(self.criterion):
            for g in info.iter_groups():
                s = np.asarray(self.criterion(graph, info, g), dtype=np.float64)
                if s.shape != (g.size,):
                    raise BudgetError(f"custom importance for group {g.name} has shape {s.shape}, expected ({g.size},)")
                scores[g.id] = s
            graph.analyses[ChannelScores] = ChannelScores("custom", scores)
            return PassResult(graph, False, graph.analyses[ChannelScores])
        crit = str(self.criterion)
        scorer = channel_criterion(crit)
        grads: dict[str, torch.Tensor] = {}
        act: dict[tuple[str, int], InputStats] = {}
        if crit == "taylor":
            grads = self._taylor(graph)
        elif crit in ("activation", "flap"):
            act = self._activations(graph, info)
        for g in info.iter_groups():
            params = [m for m in g.members if m.is_param]
            members = [(module.get_parameter(m.name), m.dim, info.channel_positions(m, g.id)) for m in params]
            total = np.zeros(g.size)
            used = False
            if isinstance(scorer, WeightCriterion):
                used = bool(members)
                if used:
                    total = scorer.score(members, g.size, self.group_prefix + g.name)
            else:
                for m, (w, dim, idx) in zip(params, members, strict=True):
                    if crit == "taylor":
                        gw = grads.get(m.name)
                        if gw is None:
                            continue
                        per = _per_position(gw, dim, "l1")
                    else:
                        stats = act.get((m.placeholder, m.dim))
                        if stats is None:
                            continue
                        col2 = _per_position(w, dim, "l2")
                        per = stats.rms * np.sqrt(col2) if crit == "activation" else stats.var * col2
                    total += reduce_positions(per, idx, g.size, "sum")
                    used = True
            if not used:
                fallback.append(g.id)
                total = L2().score(members, g.size, g.name)
            scores[g.id] = total
        if fallback:
            log.info("%d groups had no %s statistics and were scored by l2", len(fallback), crit)
        result = ChannelScores(crit, scores, tuple(fallback), act)
        graph.analyses[ChannelScores] = result
        return PassResult(graph, False, result)

    def _taylor(self, graph: Graph) -> dict[str, torch.Tensor]:
        module = graph.module
        loss_fn = self.loss_fn or default_loss
        params = dict(module.named_parameters())
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = module.training
        module.eval()
        try:
            takes_labels = "labels" in inspect.signature(module.forward).parameters
            for args, kwargs in track(shard(calibration_calls(graph, self.calib)), "taylor scoring"):
                if takes_labels and self.loss_fn is None and "labels" not in kwargs and "input_ids" in kwargs:
                    # Language-modelling loss (LLM-Pruner): the model shifts the labels itself.
                    labels = kwargs["input_ids"].clone()
                    if "attention_mask" in kwargs:
                        labels[kwargs["attention_mask"] == 0] = -100
                    kwargs = {**kwargs, "labels": labels}
                module.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = loss_fn(module(*args, **kwargs))
                    loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += (p.detach().float() * p.grad.float()).abs()
        finally:
            module.zero_grad(set_to_none=True)
            module.train(was_training)
        return all_reduce_sum(acc, inplace=True)

    def _activations(self, graph: Graph, info: DependencyInfo) -> dict[tuple[str, int], InputStats]:
        """Mean and variance of each consumer's input per channel, keyed by (weight placeholder, dim).

        Activations are read with forward pre-hooks on the modules that own consumer weights (linear,
        conv, Hugging Face Conv1D), so calibration batches may have any batch size and sequence length.
        """
        module = graph.module
        state = {**graph.params, **graph.buffers}
        sums: dict[tuple[str, int], torch.Tensor] = {}
        firsts: dict[tuple[str, int], torch.Tensor] = {}
        counts: dict[tuple[str, int], int] = {}
        hooks = []
        seen: set[str] = set()
        for use in info.consumers:
            fqn = state.get(use.weight_node)
            if fqn is None or use.weight_node in seen:
                continue
            path, _, leaf = fqn.rpartition(".")
            owner = module.get_submodule(path) if path else module
            if leaf != "weight":
                continue
            if isinstance(owner, nn.modules.conv._ConvNd):
                channel_dim = 1
            elif isinstance(owner, nn.Linear) or type(owner).__name__ == "Conv1D":
                channel_dim = -1
            else:
                continue
            seen.add(use.weight_node)
            key = (use.weight_node, use.weight_dim)

            def hook(_mod: nn.Module, inputs: tuple[Any, ...], key: tuple[str, int] = key, dim: int = channel_dim) -> None:
                x = inputs[0].detach().double().movedim(dim, -1)
                x = x.reshape(-1, x.shape[-1])
                sums[key] = sums.get(key, torch.zeros(x.shape[-1], dtype=torch.float64)) + x.pow(2).sum(0)
                firsts[key] = firsts.get(key, torch.zeros(x.shape[-1], dtype=torch.float64)) + x.sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(owner.register_forward_pre_hook(hook))
        run_calibration(module, shard(calibration_calls(graph, self.calib)), hooks)
        sums, firsts, counts = all_reduce_sum(sums, inplace=True), all_reduce_sum(firsts), all_reduce_sum(counts)
        out: dict[tuple[str, int], InputStats] = {}
        for k, sq in sums.items():
            n = max(counts[k], 1)
            mean = (firsts[k] / n).numpy()
            out[k] = InputStats(mean, np.maximum((sq / n).numpy() - mean**2, 0.0))
        return out
