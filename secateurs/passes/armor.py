"""ARMOR-style sparse factorization: ``W ~ A . S . B`` with ``S`` 2:4-sparse and ``A``, ``B`` block-diagonal.

For every targeted linear layer, ``S`` starts as the N:M weights chosen by SparseGPT (or Wanda) and ``A``,
``B`` as identities, so the starting point is exactly that method's result. Block-coordinate descent then
lowers the layer-wise reconstruction loss ``||X W^T - X (A S B)^T||^2`` on the calibration inputs ``X``:
a closed-form least-squares step for every block of ``A`` and gradient steps (Adam) on ``B`` and on the kept
values of ``S`` (its mask is fixed, so ``S`` stays N:M). The best iterate is kept, so the proxy loss is never
worse than the starting method's. The layer becomes :class:`ArmorLinear`: ``x -> x B^T -> S -> A``, where the
``S`` product is the one 2:4 sparse kernels accelerate and ``A``, ``B`` cost ``block`` multiply-adds per value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph
from secateurs.modeling.layers import ArmorLinear
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.base import Pass, PassResult, recorded
from secateurs.passes.hooks import calibration_calls, layer_targets, run_calibration
from secateurs.passes.sparse_masks import _nm_mask, _sparsegpt

__all__ = ["ArmorLinear", "ArmorRecord", "FactorizeARMOR", "fit_armor"]


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


def fit_armor(w: torch.Tensor, x: torch.Tensor, *, nm: tuple[int, int] = (2, 4), block: int = 4, steps: int = 150,
              lr: float = 5e-3, init: str = "sparsegpt") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float,
                                                                   float]:
    """Fit ``A``, ``S``, ``B`` for weight ``w`` ``[out, in]`` on inputs ``x`` ``[tokens, in]``.

    Returns:
        (A blocks ``[out/block, block, block]``, S ``[out, in]``, B blocks ``[in/block, block, block]``,
        starting proxy loss, final proxy loss); the losses are ``||x w^T - x (A S B)^T||^2 / ||x w^T||^2``.

    """
    out_f, in_f = w.shape
    if out_f % block or in_f % block or in_f % nm[1]:
        raise BudgetError(f"ARMOR needs dims divisible by the block ({block}) and M ({nm[1]}), got {tuple(w.shape)}")
    w = w.double()
    x = x.double()
    y = x @ w.t()
    scale = max(float(y.pow(2).sum()), 1e-30)
    if init == "sparsegpt":
        s0, mask = _sparsegpt(w, x.t() @ x, 0.5, nm)
    elif init == "wanda":
        mask = _nm_mask(w.abs() * x.pow(2).sum(0).sqrt().reshape(1, -1), *nm)
        s0 = w * mask
    else:
        raise BudgetError(f"ARMOR init must be 'sparsegpt' or 'wanda', got {init!r}")
    mask = mask.to(w.dtype)
    eye = torch.eye(block, dtype=w.dtype)
    a = eye.repeat(out_f // block, 1, 1)
    b = eye.repeat(in_f // block, 1, 1)
    s = (s0 * mask).clone()

    def loss(a_: torch.Tensor, s_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        return (x @ (_block_diag(a_) @ (s_ * mask) @ _block_diag(b_)).t() - y).pow(2).sum() / scale

    start = float(loss(a, s, b))
    best = (start, a.clone(), s.clone(), b.clone())

    def solve_a(s_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        z = x @ ((s_ * mask) @ _block_diag(b_)).t()  # [tokens, out]
        blocks = []
        for i in range(out_f // block):
            zi, yi = z[:, i * block:(i + 1) * block], y[:, i * block:(i + 1) * block]
            gram = zi.t() @ zi + 1e-10 * torch.eye(block, dtype=zi.dtype)
            blocks.append(torch.linalg.solve(gram, zi.t() @ yi).t())
        return torch.stack(blocks)

    s_p = nn.Parameter(s.clone())
    b_p = nn.Parameter(b.clone())
    opt = torch.optim.Adam([s_p, b_p], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            a = solve_a(s_p.detach(), b_p.detach())
        opt.zero_grad()
        value = loss(a, s_p, b_p)
        value.backward()
        opt.step()
        with torch.no_grad():
            a = solve_a(s_p.detach(), b_p.detach())
            current = float(loss(a, s_p, b_p))
            if current < best[0]:
                best = (current, a.clone(), s_p.detach().clone(), b_p.detach().clone())
    final, a, s, b = best
    return a, s * mask, b, start, final


@dataclasses.dataclass(frozen=True)
class ArmorRecord:
    """Per layer: proxy loss of the starting method and of the fitted factorization."""

    layers: tuple[tuple[str, float, float], ...]


class FactorizeARMOR(Pass):
    """Transform pass: replace linear layers by :class:`ArmorLinear` fitted on calibration inputs."""

    requires = (DependencyInfo,)
    transforms = True
    transactional = True

    def __init__(self, *, calib: Iterable[Any] | None = None, block: int = 4, steps: int = 150, lr: float = 5e-3,
                 init: str = "sparsegpt", ignore: tuple[str, ...] = ()) -> None:
        """Create the pass (see :func:`fit_armor` for ``block``, ``steps``, ``lr`` and ``init``)."""
        self.calib, self.block, self.steps, self.lr, self.init, self.ignore = calib, block, steps, lr, init, ignore

    def run(self, graph: Graph) -> PassResult:
        """Fit every eligible linear layer and re-capture (each replaced layer recorded in the transaction)."""
        with recorded() as snap:
            return self._run(graph, snap)

    def _run(self, graph: Graph, snap: Snapshot) -> PassResult:
        model = graph.module
        targets = layer_targets(graph, lambda m: isinstance(m, nn.Linear), self.ignore)
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in targets}
        hooks = [m.register_forward_pre_hook(
            lambda _m, inp, n=n: inputs[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))) for n, m in targets]
        run_calibration(model, calibration_calls(graph, self.calib), hooks)
        layers = []
        for name, mod in targets:
            assert isinstance(mod, nn.Linear)
            a, s, b, start, final = fit_armor(mod.weight.detach(), torch.cat(inputs[name]), block=self.block,
                                              steps=self.steps, lr=self.lr, init=self.init)
            dtype = mod.weight.dtype
            new = ArmorLinear(a.to(dtype), s.to(dtype), b.to(dtype),
                              None if mod.bias is None else mod.bias.detach().clone())
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            snap.record(owner, "attr", leaf, mod)
            setattr(owner, leaf, new)
            layers.append((name, start, final))
        if not layers:
            return PassResult(graph, False, ArmorRecord(()))
        return PassResult(capture_call(model, graph.args, graph.kwargs), True, ArmorRecord(tuple(layers)))
