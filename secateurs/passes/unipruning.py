"""UniPruning for weight sparsity: a local saliency anchor, global feedback, and a mirror-descent controller.

The method of "UniPruning: Unifying Local Metric and Global Feedback for Scalable Sparse LLMs" (Ding et al.,
2025), without its weight training: the weights never change, only the masks are chosen. What runs here:

* **Local saliency (the anchor).** Per weight, the pass's criterion score (Wanda's ``|w| * ||x_j||``, or
  ``|w|``), divided by its layer's mean so every layer's anchor has mean 1.
* **Global feedback.** Each step masks the model with the current choice and runs one calibration batch; the
  loss is the masked model's distance to the dense model's outputs (the KL divergence of the next-token
  distributions when the model returns logits, else the relative squared error of its float outputs). Its
  gradient with respect to each effective weight ``w * m`` gives every weight's first-order value
  ``v = -g * w``: the loss increase of removing a kept weight, or the decrease of restoring a removed one.
* **Saliency variable.** ``z <- (1 - kappa) z + kappa * anchor + eta * v / mean|v|`` per layer: the feedback
  moves weights across the threshold, the anchor keeps the ranking close to the local metric (the paper's
  "saliency anchoring").
* **Global controller (unstructured).** A log-multiplier ``theta_l`` per layer sets its sparsity
  ``s_l = clip(ratio * exp(theta_l + mu), ratio - band, ratio + band)``, ``mu`` chosen so the targeted weights
  meet the budget exactly. Mirror descent with the entropy mirror map (exponentiated gradient):
  ``theta_l <- theta_l - eta_c * log(c_l / geomean(c))``, where ``c_l`` is the mean ``|v|`` of the layer's
  marginal weights (those ranked next to its threshold). At the optimum these marginal costs are equal
  across layers; the normalisation and the clip are the exact KL projection onto the capped budget.
* **Masks.** From ``z`` and the layer sparsities: per output row (as Wanda compares), the layer's count
  split over its rows exactly; under N:M the ``N`` lowest ``z`` of every group of ``M``. The pattern fixes every
  layer's sparsity under N:M, so there the controller has nothing to move and only the ranking changes.

The search is recorded: the measured loss at every step, the first-order estimate of the final masks' loss
against the loss they measure on all calibration batches, the per-layer sparsities and the time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from secateurs.distributed import all_reduce_sum, world_size
from secateurs.errors import BudgetError
from secateurs.passes.hooks import Call
from secateurs.passes.sparse_masks import _as_rows, _from_rows, _nm_mask, _row_mask, _weight

__all__ = ["UniSearch", "distill_loss", "masked_distance", "search_masks"]

@dataclasses.dataclass(frozen=True)
class UniSearch:
    """What the UniPruning search did.

    Attributes:
        steps: Feedback steps (one calibration batch each, cycling).
        losses: The masked model's loss at each step (its distance to the dense outputs), the first one with
            the anchor's masks at uniform sparsity.
        estimated_loss: The final masks' loss as the last step's first-order terms predict it.
        measured_loss: The final masks' loss, averaged over every calibration batch.
        anchor_loss: The anchor's masks at uniform sparsity (what the local metric alone gives), measured the
            same way.
        layer_ratios: ``(layer, sparsity)`` the controller chose (every targeted layer).
        seconds: Wall time of the search.

    """

    steps: int
    losses: tuple[float, ...]
    estimated_loss: float
    measured_loss: float
    anchor_loss: float
    layer_ratios: tuple[tuple[str, float], ...]
    seconds: float


def distill_loss(out: Any, ref: Any) -> torch.Tensor:
    """The masked output's distance to the dense one: KL of the next-token distributions, or relative MSE."""
    lo, lr = getattr(out, "logits", None), getattr(ref, "logits", None)
    if isinstance(lo, torch.Tensor) and isinstance(lr, torch.Tensor) and lo.is_floating_point() and lo.dim() >= 2:
        return F.kl_div(F.log_softmax(lo.float(), -1).flatten(0, -2), F.log_softmax(lr.float(), -1).flatten(0, -2),
                        log_target=True, reduction="batchmean")
    outs, refs = _floats(out), _floats(ref)
    if not outs or len(outs) != len(refs):
        raise BudgetError("the search compares the masked model's outputs with the dense ones and needs "
                          "floating-point outputs; this model returned none")
    num = sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(outs, refs, strict=True))
    den = sum((r.float() ** 2).sum() for r in refs)
    return num / den.clamp_min(1e-30)  # type: ignore[no-any-return, union-attr]


def _floats(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _Layer:
    """One targeted layer: its weight as rows, anchor, saliency variable and the parameter name it replaces."""

    def __init__(self, name: str, module: nn.Module, anchor: torch.Tensor, fqn: str) -> None:
        self.name, self.module, self.fqn = name, module, fqn
        self.weight = _weight(module).detach()
        rows = _as_rows(self.weight, module).float()
        self.rows = rows
        mean = float(anchor.float().mean())
        self.anchor = anchor.float() / mean if mean > 0 else torch.ones_like(rows)
        self.z = self.anchor.clone()
        self.size = rows.numel()


def _counts(layers: Sequence[_Layer], theta: torch.Tensor, ratio: float, band: float, cap: float) -> list[int]:
    """Removed weights per layer: ``ratio * exp(theta + mu)`` clipped to the band, summing to the budget exactly."""
    sizes = torch.tensor([float(x.size) for x in layers], dtype=torch.float64)
    want = int(round(float(sizes.sum()) * ratio))
    lo = torch.full_like(sizes, max(0.0, ratio - band))
    hi = torch.full_like(sizes, min(cap, ratio + band))
    if ratio > cap:
        raise BudgetError(f"{ratio:.0%} sparsity does not fit under the per-layer cap {cap:.0%}")

    def share(mu: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(ratio * torch.exp(theta.double() + mu), lo), hi)

    a, b = -50.0, 50.0
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if float((share(mid) * sizes).sum()) < want else (a, mid)
    raw = share(b) * sizes
    floor = [math.ceil(float(x) * n - 1e-9) for x, n in zip(lo, sizes.tolist(), strict=True)]
    ceil = [math.floor(float(x) * n + 1e-9) for x, n in zip(hi, sizes.tolist(), strict=True)]
    if not sum(floor) <= want <= sum(ceil):
        raise BudgetError(f"{ratio:.0%} sparsity cannot be split into whole weights within every layer's band "
                          f"({ratio - band:.0%} to {min(cap, ratio + band):.0%})")
    counts = [min(max(int(math.floor(float(r))), f), c) for r, f, c in zip(raw, floor, ceil, strict=True)]
    frac = [float(r) - c for r, c in zip(raw, counts, strict=True)]
    short = want - sum(counts)
    order = sorted(range(len(layers)), key=lambda i: -frac[i] if short > 0 else frac[i])
    while short:  # one weight at a time: largest remainders get the missing ones, smallest give back the extra
        for i in order:
            if short and (ceil[i] > counts[i] if short > 0 else floor[i] < counts[i]):
                counts[i] += 1 if short > 0 else -1
                short += -1 if short > 0 else 1
    return counts


def _masks(layers: Sequence[_Layer], counts: list[int] | None, nm: tuple[int, int] | None) -> list[torch.Tensor]:
    if nm is not None:
        return [_nm_mask(x.z, *nm) for x in layers]
    assert counts is not None
    return [_row_mask(x.z, c) for x, c in zip(layers, counts, strict=True)]


def _effective(layers: Sequence[_Layer], masks: list[torch.Tensor], grad: bool) -> dict[str, torch.Tensor]:
    out = {}
    for x, m in zip(layers, masks, strict=True):
        w = x.weight * _from_rows(m, x.weight, x.module).to(x.weight.dtype)
        out[x.fqn] = w.requires_grad_(True) if grad else w
    return out


def masked_distance(model: nn.Module, params: dict[str, torch.Tensor], calls: Sequence[Call],
                    teacher: Sequence[Any]) -> float:
    """:func:`distill_loss` of ``model`` run with ``params`` replaced, averaged over every calibration call.

    ``teacher`` holds the dense outputs of ``calls``; under ``torchrun`` the mean is over every rank's calls.
    """
    total = 0.0
    with torch.no_grad():
        for (args, kwargs), ref in zip(calls, teacher, strict=True):
            total += float(distill_loss(torch.func.functional_call(model, params, args, kwargs), ref))
    summed = all_reduce_sum({"loss": total, "n": float(len(calls))})
    return float(summed["loss"]) / max(1.0, float(summed["n"]))


def search_masks(model: nn.Module, targets: Sequence[tuple[str, nn.Module]], anchors: dict[str, torch.Tensor],
                 calls: Sequence[Call], *, ratio: float, nm: tuple[int, int] | None, steps: int = 16,
                 band: float = 0.1, cap: float = 0.95, kappa: float = 0.2, eta: float = 0.01,
                 eta_c: float = 0.3, margin: float = 0.05) -> tuple[dict[str, torch.Tensor], UniSearch]:
    """Choose the masks of ``targets`` (rows layout, True = keep) by the search of the module docstring.

    Args:
        model: The dense model (left unchanged: the masks are applied functionally while searching).
        targets: ``(name, module)`` of the layers to sparsify.
        anchors: Per layer name, its local saliency in rows layout.
        calls: This rank's calibration calls ``(args, kwargs)``.
        ratio: The unstructured fraction of the targeted weights to remove (ignored with ``nm``).
        nm: ``(n, m)`` for N:M masks.
        steps: Feedback steps.
        band: Largest deviation of a layer's sparsity from ``ratio``.
        cap: Largest sparsity of any layer.
        kappa: Pull of the saliency variable towards the anchor per step.
        eta: Step of the feedback on the saliency variable (in units of the layer's mean ``|v|``).
        eta_c: Step of the controller's mirror descent.
        margin: Fraction of a layer's weights on each side of its threshold whose ``|v|`` is its marginal cost.

    Returns:
        Per layer name its keep mask in rows layout, and the record of the search.

    Raises:
        BudgetError: A layer's weight is not a plain parameter (another mask is attached), the model returns no
            floating-point output, or the budget cannot be met under ``cap``.

    """
    if steps < 1:
        raise BudgetError(f"unipruning needs at least one feedback step, got {steps}")
    start = time.perf_counter()
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = []
    for name, mod in targets:
        fqn = f"{name}.weight" if name else "weight"
        if params.get(fqn) is not _weight(mod):
            raise BudgetError(f"unipruning replaces each layer's weight while it searches, and layer '{name}' has "
                              "no plain weight parameter (a mask is already attached: remove_masks first)")
        layers.append(_Layer(name, mod, anchors[name], fqn))
    if not calls and world_size() == 1:
        raise BudgetError("unipruning needs calibration batches")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            teacher = [model(*args, **kwargs) for args, kwargs in calls]
        theta = torch.zeros(len(layers), dtype=torch.float64)
        counts = None if nm is not None else _counts(layers, theta, ratio, band, cap)
        anchor_masks = _masks(layers, counts, nm)
        losses: list[float] = []
        masks = anchor_masks
        values: list[torch.Tensor] = []
        last = 0.0
        for step in range(steps):
            counts = None if nm is not None else _counts(layers, theta, ratio, band, cap)
            masks = _masks(layers, counts, nm)
            eff = _effective(layers, masks, grad=True)
            loss = torch.zeros(())
            grads: Sequence[torch.Tensor | None]
            with torch.enable_grad():
                if calls:
                    args, kwargs = calls[step % len(calls)]
                    loss = distill_loss(torch.func.functional_call(model, eff, args, kwargs),
                                        teacher[step % len(calls)])
                    grads = torch.autograd.grad(loss, list(eff.values()), allow_unused=True)
                else:  # a rank with no calibration call adds nothing to the sums
                    grads = [None] * len(layers)
            raw = {x.name: (torch.zeros_like(x.rows) if g is None else -(_as_rows(g, x.module).float() * x.rows))
                   for x, g in zip(layers, grads, strict=True)}
            summed = all_reduce_sum({**raw, "__loss__": float(loss.detach()), "__n__": 1.0 if calls else 0.0},
                                    inplace=True)
            last = float(summed["__loss__"]) / max(1.0, float(summed["__n__"]))
            losses.append(last)
            values = [summed[x.name] / max(1.0, float(summed["__n__"])) for x in layers]  # a mean, as the loss
            costs = []
            for i, (x, v) in enumerate(zip(layers, values, strict=True)):
                scale = float(v.abs().mean())
                if scale > 0:
                    x.z.mul_(1 - kappa).add_(x.anchor, alpha=kappa).add_(v, alpha=eta / scale)
                if counts is not None:  # the weights ranked within `margin` of the threshold, by two selections
                    flat = x.z.reshape(-1)
                    width = max(1, int(margin * x.size))
                    lo, hi = max(0, counts[i] - width), min(x.size, counts[i] + width)
                    near = ((flat >= flat.kthvalue(lo + 1).values) & (flat <= flat.kthvalue(hi).values)
                            if hi > lo else torch.zeros_like(flat, dtype=torch.bool))
                    costs.append(float(v.reshape(-1)[near].abs().mean()) if bool(near.any()) else 0.0)
            if counts is not None and costs:
                c = torch.tensor(costs, dtype=torch.float64).clamp_min(1e-30)
                theta -= eta_c * (c.log() - c.log().mean())
        counts = None if nm is not None else _counts(layers, theta, ratio, band, cap)
        final = _masks(layers, counts, nm)
        # first order from the last step: removing a kept weight adds v, restoring a removed one takes v away
        estimated = last + sum(float((v * (m_old.float() - m_new.float())).sum())
                               for v, m_old, m_new in zip(values, masks, final, strict=True))
        measured = masked_distance(model, _effective(layers, final, grad=False), calls, teacher)
        anchor_loss = masked_distance(model, _effective(layers, anchor_masks, grad=False), calls, teacher)
    finally:
        model.train(was_training)
    ratios = tuple((x.name, 1.0 - float(m.float().mean())) for x, m in zip(layers, final, strict=True))
    record = UniSearch(steps, tuple(losses), estimated, measured, anchor_loss, ratios, time.perf_counter() - start)
    return {x.name: m for x, m in zip(layers, final, strict=True)}, record
