"""Channel importance criteria: one registry for the in-memory, streamed and ONNX paths.

Each criterion is an object that declares what it needs: ``weights`` (the group's weights alone: every path
offers it, ONNX files included), ``calibration`` (activation statistics on calibration batches: the PyTorch
paths, in memory and streamed) or ``loss`` (gradients of a loss over the whole model: in memory only). A
weight criterion scores a group from its members' weights: :meth:`WeightCriterion.per_position` reduces one
weight along its channel dimension to one value per position, positions add up (or take the maximum) into
channels, and :meth:`WeightCriterion.finish` turns the total into scores. The calibrated criteria are scored by
:class:`secateurs.passes.importance.ScoreChannels` from the statistics it gathers; the registry holds what
they need, so every path refuses what it cannot give with the same message.

Adding a weight criterion is one class with :func:`register` (and its test): ``secateurs.prune(importance=...)``,
``--criterion``, recipes, the streamed ``prune_checkpoint`` and ``prune_onnx`` all offer it.

The criteria of the other steps (weight sparsity, depth, experts) are registered too (:func:`register_step`),
each with what it needs, so the option schema (:mod:`secateurs.spec`) offers every path the ones it can feed and
tells why the others are missing; their pass computes them (SparseGPT is a solver, FinerCut's greedy a search).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch

from secateurs.errors import BudgetError, did_you_mean

__all__ = ["L1", "L2", "MAW", "NEEDS", "STEPS", "Activation", "ChannelCriterion", "Flap", "Random", "StepCriterion",
           "Taylor", "WeightCriterion", "channel_criterion", "criteria_names", "needed", "reduce_positions", "register",
           "register_step", "step_criteria", "step_criterion"]

NEEDS = ("weights", "calibration", "model", "loss")  # from the least to the most a path must give
_NEEDED = {"weights": "the weights", "calibration": "calibration batches run through the PyTorch model",
           "model": "the whole PyTorch model at once", "loss": "gradients of a loss over the whole model"}
STEPS = ("sparsity", "depth", "experts")

_REGISTRY: dict[str, ChannelCriterion] = {}


class ChannelCriterion:
    """A channel importance criterion: its name, what it needs, and one line on what it measures."""

    name: ClassVar[str]
    needs: ClassVar[str] = "weights"
    summary: ClassVar[str] = ""


class WeightCriterion(ChannelCriterion):
    """A criterion computed from the group's weights alone."""

    reduce: ClassVar[str] = "sum"  # how positions combine into a channel: "sum" or "max"

    def per_position(self, weight: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
        """One value per position of ``weight`` along ``dim``."""
        raise NotImplementedError(f"{type(self).__name__} must define per_position")

    def finish(self, total: np.ndarray, group: str) -> np.ndarray:
        """The group's scores from the combined totals (``group`` is its name)."""
        return total

    def score(self, members: Iterable[tuple[np.ndarray | torch.Tensor, int, np.ndarray]], size: int,
              group: str) -> np.ndarray:
        """Scores of a group of ``size`` channels from ``(weight, dim, channel of every position)`` members."""
        total = np.zeros(size)
        for weight, dim, idx in members:
            red = reduce_positions(self.per_position(weight, dim), idx, size, self.reduce)
            total = np.maximum(total, red) if self.reduce == "max" else total + red
        return self.finish(total, group)


def reduce_positions(values: np.ndarray, idx: np.ndarray, size: int, how: str) -> np.ndarray:
    """Per-position ``values`` combined into a group's ``size`` channels (``idx``: channel of each position)."""
    hit = idx >= 0
    if how == "max":
        out = np.zeros(size)
        np.maximum.at(out, idx[hit], values[hit])
        return out
    return np.bincount(idx[hit], weights=values[hit], minlength=size).astype(np.float64)


def _reduced(weight: np.ndarray | torch.Tensor, dim: int, how: str) -> np.ndarray:
    """``weight`` reduced over everything but ``dim`` (``abs_sum``, ``sq_sum`` or ``abs_max``), as float64.

    Tensors are reduced in float32 by torch, arrays (ONNX initializers) in float64 by numpy, as each path did.
    """
    if isinstance(weight, np.ndarray):
        x = np.moveaxis(np.asarray(weight, dtype=np.float64), dim, 0).reshape(weight.shape[dim], -1)
        if how == "abs_sum":
            return np.abs(x).sum(1)
        if how == "sq_sum":
            return np.square(x).sum(1)
        return np.abs(x).max(1) if x.shape[1] else np.zeros(x.shape[0])
    t = weight.detach().float().movedim(dim, 0).reshape(weight.shape[dim], -1)
    if how == "abs_sum":
        r = t.abs().sum(1)
    elif how == "sq_sum":
        r = t.pow(2).sum(1)
    else:
        r = t.abs().amax(1) if t.shape[1] else torch.zeros(t.shape[0])
    return r.double().cpu().numpy()


def register(cls: type[ChannelCriterion]) -> type[ChannelCriterion]:
    """Class decorator: add a criterion to the registry under its ``name``."""
    if cls.needs not in NEEDS:
        raise ValueError(f"criterion {cls.__name__} needs {cls.needs!r}; choose one of {', '.join(NEEDS)}")
    _REGISTRY[cls.name] = cls()
    return cls


def criteria_names(needs: Iterable[str] = NEEDS) -> tuple[str, ...]:
    """The registered criteria whose needs are among ``needs``, in registration order."""
    allowed = set(needs)
    return tuple(n for n, c in _REGISTRY.items() if c.needs in allowed)


def channel_criterion(name: Any, *, needs: Iterable[str] = NEEDS, where: str = "") -> ChannelCriterion:
    """The criterion ``name``; a path that gives only ``needs`` refuses the others with the reason.

    Raises:
        BudgetError: ``name`` is not registered (with the closest names), or needs more than the path gives.

    """
    allowed = tuple(needs)
    crit = _REGISTRY.get(name) if isinstance(name, str) else None
    if crit is None:
        raise BudgetError(f"unknown importance criterion {name!r}{did_you_mean(name, _REGISTRY)}; choose one of "
                          f"{', '.join(criteria_names(allowed))}")
    if crit.needs not in allowed:
        raise BudgetError(f"importance {name!r} needs {needed(crit.needs)}, which {where or 'this path'} does not "
                          f"have; choose one of {', '.join(criteria_names(allowed))}")
    return crit


def needed(needs: str) -> str:
    """What a need means, in words (``"calibration"``: calibration batches run through the PyTorch model)."""
    return _NEEDED[needs]


@dataclasses.dataclass(frozen=True)
class StepCriterion:
    """A criterion of the sparsity, depth or expert step: its name, what it needs, what it measures."""

    step: str
    name: str
    needs: str
    summary: str


_STEP_REGISTRY: dict[str, dict[str, StepCriterion]] = {step: {} for step in STEPS}


def register_step(step: str, name: str, needs: str, summary: str) -> StepCriterion:
    """Register the criterion ``name`` of ``step`` (one of :data:`STEPS`); its pass computes it."""
    if step not in STEPS or needs not in NEEDS:
        raise ValueError(f"step must be one of {STEPS} and needs one of {NEEDS}, got {step!r}, {needs!r}")
    crit = StepCriterion(step, name, needs, summary)
    _STEP_REGISTRY[step][name] = crit
    return crit


def step_criteria(step: str, needs: Iterable[str] = NEEDS) -> tuple[str, ...]:
    """The registered criteria of ``step`` whose needs are among ``needs``, in registration order."""
    allowed = set(needs)
    return tuple(n for n, c in _STEP_REGISTRY[step].items() if c.needs in allowed)


def step_criterion(step: str, name: str) -> StepCriterion | None:
    """The criterion ``name`` of ``step``, or None."""
    return _STEP_REGISTRY[step].get(name)


register_step("sparsity", "magnitude", "weights", "|w| per layer")
register_step("sparsity", "wanda", "calibration", "|w| x the input channel's norm, per output row")
register_step("sparsity", "sparsegpt", "calibration", "OBS with the inverse calibration Hessian, updating kept weights")
register_step("sparsity", "global_magnitude", "model", "one |w| threshold across every layer, each capped at 95%")
register_step("depth", "bi", "calibration", "block influence: 1 - cos(block input, block output)")
register_step("depth", "angular", "calibration", "the n consecutive blocks with the smallest angular distance")
register_step("depth", "greedy", "model", "remove the candidate that changes the final output least, re-running the "
              "model for every candidate (FinerCut)")
register_step("experts", "frequency", "calibration", "tokens routed to the expert")
register_step("experts", "mass", "calibration", "summed router probability of the expert")
register_step("experts", "output_norm", "calibration", "summed norm of the expert's routing-weighted output")


@register
class L1(WeightCriterion):
    """``l1``: the sum of |w| over every weight a channel owns."""

    name = "l1"
    summary = "sum of |w| over the weights a channel owns"

    def per_position(self, weight: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
        """Sum of |w| per position."""
        return _reduced(weight, dim, "abs_sum")


@register
class L2(WeightCriterion):
    """``l2``: the root of the sum of w^2 over every weight a channel owns."""

    name = "l2"
    summary = "root of the sum of w^2 over the weights a channel owns"

    def per_position(self, weight: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
        """Sum of w^2 per position."""
        return _reduced(weight, dim, "sq_sum")

    def finish(self, total: np.ndarray, group: str) -> np.ndarray:
        """The root of the summed squares."""
        return np.sqrt(total)


@register
class MAW(WeightCriterion):
    """``maw``: the largest |w| a channel owns (the GLU width-pruning criterion)."""

    name = "maw"
    reduce = "max"
    summary = "largest |w| a channel owns"

    def per_position(self, weight: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
        """Largest |w| per position."""
        return _reduced(weight, dim, "abs_max")


@register
class Random(WeightCriterion):
    """``random``: uniform random scores, fixed by the group's name (the baseline every criterion must beat)."""

    name = "random"
    summary = "uniform random scores, the same on every run (a baseline)"

    def per_position(self, weight: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
        """Nothing is read from the weights."""
        return np.zeros(weight.shape[dim])

    def finish(self, total: np.ndarray, group: str) -> np.ndarray:
        """Scores drawn from a generator seeded by the group's name."""
        return np.asarray(np.random.default_rng(zlib.crc32(group.encode())).random(total.shape[0]))


@register
class Taylor(ChannelCriterion):
    """``taylor``: first-order Taylor, the sum of |w * dL/dw| over calibration batches."""

    name = "taylor"
    needs = "loss"
    summary = "sum of |w * dL/dw| over calibration batches"


@register
class Activation(ChannelCriterion):
    """``activation``: Wanda / FLAP style, input RMS of each consumer times its weight column's norm."""

    name = "activation"
    needs = "calibration"
    summary = "input RMS of each consumer times the norm of its weight column"


@register
class Flap(ChannelCriterion):
    """``flap``: the fluctuation of each consumer's input (variance times squared column norm)."""

    name = "flap"
    needs = "calibration"
    summary = "variance of each consumer's input times its squared weight column norm"
