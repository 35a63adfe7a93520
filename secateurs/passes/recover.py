"""Training-free recovery after sparsification: least-squares refit of kept weights, bias and norm re-calibration.

For every linear layer of the pruned model whose shape matches the same-named layer of the dense reference,
the kept weights of each output row are refit so the layer reproduces the dense layer's output on the
calibration data: ``min || X_p w_K - X_d W_d^T ||`` over the row's kept inputs ``K`` (normal equations,
dampened), where ``X_p`` is the layer's input in the pruned model and ``X_d`` in the dense one. Masks are
respected (pruned weights stay zero). Biases then absorb the remaining mean output shift, and BatchNorm running
statistics are re-estimated on the calibration data.

Fine-tuning with LoRA while masks stay applied: masks attached by :class:`SparsifyWeights` live in
``torch.nn.utils.prune`` forward pre-hooks on the base layers, so adapters that wrap those layers (peft's LoRA)
train on top of the masked weights; call :func:`~secateurs.passes.sparsity.remove_masks` after merging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from secateurs.errors import BudgetError
from secateurs.ir.graph import Graph
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.base import Pass, PassResult, recorded
from secateurs.passes.hooks import calibration_calls

__all__ = ["ReconstructLayers", "ReconstructRecord"]


@dataclasses.dataclass(frozen=True)
class ReconstructRecord:
    """Per refit layer: relative output error on the calibration data before and after."""

    layers: tuple[tuple[str, float, float], ...]
    norms: int


def _base(mod: nn.Module) -> torch.Tensor:
    """The trainable weight: ``weight_orig`` when a mask is attached, else ``weight``."""
    w = getattr(mod, "weight_orig", None)
    if not isinstance(w, torch.Tensor):
        w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise BudgetError(f"{type(mod).__name__} has no weight")
    return w


def _mask(mod: nn.Module) -> torch.Tensor:
    mask = getattr(mod, "weight_mask", None)
    if isinstance(mask, torch.Tensor):
        return mask
    w = _base(mod)
    return (w != 0).to(w.dtype)


class ReconstructLayers(Pass):
    """Transform pass: layer-wise least squares against a dense reference (see the module docstring).

    Weights, biases and norm statistics are edited in place, each copied into the transaction first.
    """

    transforms = True
    transactional = True

    def __init__(self, dense: nn.Module, *, calib: Iterable[Any] | None = None, weights: bool = True,
                 biases: bool = True, norms: bool = True, damp: float = 1e-3) -> None:
        """Create the pass.

        Args:
            dense: The model before pruning (same layer names).
            calib: Calibration batches (defaults to the example inputs).
            weights: Refit kept weights by least squares.
            biases: Shift biases by the mean remaining output difference.
            norms: Re-estimate BatchNorm running statistics.
            damp: Added to the normal equations' diagonal, relative to its mean.

        """
        if not isinstance(dense, nn.Module):
            raise BudgetError("ReconstructLayers needs the dense model as reference")
        self.dense, self.calib = dense, calib
        self.weights, self.biases, self.norms, self.damp = weights, biases, norms, damp
        self._snap = Snapshot()  # the transaction of the running call (see run)

    def run(self, graph: Graph) -> PassResult:
        """Refit and re-calibrate in place (shapes do not change)."""
        with recorded() as self._snap:
            return self._run(graph)

    def _run(self, graph: Graph) -> PassResult:
        model = graph.module
        calls = calibration_calls(graph, self.calib)
        dense_mods = dict(self.dense.named_modules())
        targets = []
        for name, mod in model.named_modules():
            ref = dense_mods.get(name)
            if isinstance(mod, nn.Linear) and isinstance(ref, nn.Linear) and ref.weight.shape == mod.weight.shape:
                targets.append((name, mod, ref))
        layers = []
        model.eval()
        self.dense.eval()
        for name, mod, ref in targets:
            xp, xd = self._inputs(model, mod, calls), self._inputs(self.dense, ref, calls)
            with torch.no_grad():
                target = torch.nn.functional.linear(xd, ref.weight.double(), None if ref.bias is None else
                                                    ref.bias.double())
                before = self._error(mod, xp, target)
                if self.weights:
                    self._refit(mod, xp, target)
                if self.biases and mod.bias is not None:
                    current = torch.nn.functional.linear(xp, mod.weight.double(), mod.bias.double())
                    self._snap.record_values(mod.bias)
                    mod.bias.add_((target - current).mean(0).to(mod.bias.dtype))
                layers.append((name, before, self._error(mod, xp, target)))
        count = self._recalibrate_norms(model, calls, self._snap) if self.norms else 0
        return PassResult(graph, bool(layers) or count > 0, ReconstructRecord(tuple(layers), count))

    @staticmethod
    def _inputs(model: nn.Module, layer: nn.Module, calls: list[Any]) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(
            lambda _m, inp: seen.append(inp[0].detach().double().reshape(-1, inp[0].shape[-1])))
        try:
            with torch.no_grad():
                for args, kwargs in calls:
                    model(*args, **kwargs)
        finally:
            handle.remove()
        return torch.cat(seen)

    @staticmethod
    def _error(mod: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> float:
        out = torch.nn.functional.linear(x, mod.weight.double(), None if mod.bias is None else mod.bias.double())
        return float((out - target).norm() / target.norm().clamp_min(1e-12))

    def _refit(self, mod: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> None:
        mask = _mask(mod).bool()
        y = target - (mod.bias.double() if mod.bias is not None else 0.0)
        h = x.t() @ x
        h = h + self.damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
        xty = x.t() @ y  # [in, out]
        base = _base(mod)
        new = torch.zeros_like(base, dtype=torch.float64)
        for r in range(new.shape[0]):
            keep = torch.nonzero(mask[r]).flatten()
            if keep.numel():
                new[r, keep] = torch.linalg.solve(h[keep][:, keep], xty[keep, r])
        self._snap.record_values(base)
        base.copy_(new.to(base.dtype))
        if hasattr(mod, "weight_orig"):
            # refresh the masked weight that the mask's pre-hook recomputes on the next forward
            self._snap.record(mod, "attr", "weight", mod.weight)
            setattr(mod, "weight", base * _mask(mod))  # noqa: B010

    @staticmethod
    def _recalibrate_norms(model: nn.Module, calls: list[Any], snap: Snapshot) -> int:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.track_running_stats]
        if not norms:
            return 0
        saved = [(m, m.momentum) for m in norms]
        model.eval()  # dropout and the like stay off; only the norms update their statistics
        for m in norms:
            for buffer in m.buffers(recurse=False):
                snap.record_values(buffer)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            m.train()
        try:
            with torch.no_grad():
                for args, kwargs in calls:
                    model(*args, **kwargs)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
                m.eval()
        return len(norms)
