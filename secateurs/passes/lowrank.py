"""Low-rank factorization: a linear layer ``W`` becomes two thin ones from a truncated SVD.

``plain``: ``W ~ U_r S_r V_r^T``. ``whitened`` (activation-aware, as in SVD-LLM / ASVD): the SVD of
``W L`` where ``L L^T = X^T X`` is the (dampened) Cholesky factor of the layer's calibration input
covariance, so the truncation minimises the output error ``||X W^T - X W_r^T||`` instead of the weight
error. The rank of each layer comes from an energy threshold (the smallest rank keeping that fraction of
the squared singular values) or from a parameter budget (one threshold searched for all layers). A layer is
factorized only where the two thin layers have fewer parameters than the original.
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
from secateurs.modeling.layers import LowRankLinear
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.base import Pass, PassResult, recorded
from secateurs.passes.hooks import calibration_calls, layer_targets, run_calibration

__all__ = ["FactorizeLowRank", "LowRankLinear", "LowRankRecord"]


@dataclasses.dataclass(frozen=True)
class LowRankRecord:
    """Each factorized layer with its rank and full rank, and the parameters before / after."""

    layers: tuple[tuple[str, int, int], ...]
    params_before: int
    params_after: int


class FactorizeLowRank(Pass):
    """Transform pass: replace linear layers by :class:`LowRankLinear` where that saves parameters.

    Requires :class:`DependencyInfo` (layers whose outputs reach a graph output are left alone).
    """

    requires = (DependencyInfo,)
    transforms = True
    transactional = True

    def __init__(
        self,
        energy: float = 0.9,
        *,
        param_ratio: float | None = None,
        rank: int | None = None,
        method: str = "plain",
        calib: Iterable[Any] | None = None,
        ignore: tuple[str, ...] = (),
        damp: float = 1e-4,
        only_if_smaller: bool = True,
    ) -> None:
        """Create the pass.

        Args:
            energy: Fraction of squared singular values every layer keeps, in (0, 1].
            param_ratio: Instead of ``energy``: fraction of the targeted layers' parameters to remove; one energy
                threshold is searched so the total meets it.
            rank: Instead of ``energy``: the same rank for every layer (capped at its full rank).
            method: ``"plain"`` or ``"whitened"`` (activation-aware; uses ``calib``).
            calib: Calibration batches for ``whitened`` (defaults to the example inputs).
            ignore: Module names (or prefixes ending in ``.``) left alone.
            damp: Added to the input covariance's diagonal (relative to its mean) before the Cholesky.
            only_if_smaller: Skip layers whose factors would not save parameters (off: factorize anyway).

        """
        if method not in ("plain", "whitened"):
            raise BudgetError(f"method must be 'plain' or 'whitened', got {method!r}")
        if param_ratio is None and not 0.0 < energy <= 1.0:
            raise BudgetError(f"energy must be in (0, 1], got {energy!r}")
        if param_ratio is not None and not 0.0 < param_ratio < 1.0:
            raise BudgetError(f"param_ratio must be in (0, 1), got {param_ratio!r}")
        if rank is not None and rank < 1:
            raise BudgetError(f"rank must be >= 1, got {rank!r}")
        self.energy, self.param_ratio, self.method, self.calib = energy, param_ratio, method, calib
        self.rank = rank
        self.ignore, self.damp, self.only_if_smaller = ignore, damp, only_if_smaller

    def _targets(self, graph: Graph) -> list[tuple[str, nn.Linear]]:
        return [(n, m) for n, m in layer_targets(graph, lambda m: isinstance(m, nn.Linear), self.ignore)
                if isinstance(m, nn.Linear)]

    def run(self, graph: Graph) -> PassResult:
        """Factorize and re-capture (each replaced layer recorded in the transaction)."""
        with recorded() as snap:
            return self._run(graph, snap)

    def _run(self, graph: Graph, snap: Snapshot) -> PassResult:
        targets = self._targets(graph)
        whiten = self._covariances(graph, targets) if self.method == "whitened" else {}
        factors = {}
        for name, mod in targets:
            w = mod.weight.detach().double()
            if name in whiten:
                cov = whiten[name]
                cov = cov + self.damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
                chol = torch.linalg.cholesky(cov)
                u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
                vh = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)  # V^T L^{-1}
            else:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
            factors[name] = (u, s, vh)
        ranks = self._ranks(targets, factors)
        before = sum(m.weight.numel() for _, m in targets)
        changed = []
        after = 0
        with torch.no_grad():
            for name, mod in targets:
                rank = ranks[name]
                out_f, in_f = mod.weight.shape
                if self.only_if_smaller and rank * (in_f + out_f) >= in_f * out_f:
                    after += mod.weight.numel()
                    continue
                u, s, vh = factors[name]
                low = LowRankLinear(in_f, out_f, rank, mod.bias is not None)
                low.down.weight.copy_((s[:rank, None] * vh[:rank]).to(mod.weight.dtype))
                low.up.weight.copy_(u[:, :rank].to(mod.weight.dtype))
                if mod.bias is not None:
                    low.up.bias.copy_(mod.bias)
                parent, _, leaf = name.rpartition(".")
                owner = graph.module.get_submodule(parent) if parent else graph.module
                snap.record(owner, "attr", leaf, mod)
                setattr(owner, leaf, low)
                changed.append((name, rank, min(in_f, out_f)))
                after += rank * (in_f + out_f)
        record = LowRankRecord(tuple(changed), before, after)
        if not changed:  # asked to factorise, did nothing: refuse rather than exit 0 with an unchanged model
            what = f"rank={self.rank}" if self.rank is not None else f"param_ratio={self.param_ratio:g}" \
                if self.param_ratio is not None else f"energy={self.energy:g} (--low-rank)"
            raise BudgetError(
                f"low-rank factorisation with {what} saves parameters in none of the {len(targets)} eligible linear "
                "layers (a rank-r factor pays off only below in*out/(in+out)); keep less energy or give a rank"
                if targets else "low-rank factorisation found no eligible linear layer (layers computing a graph "
                "output and ignored ones are left alone)")
        return PassResult(capture_call(graph.module, graph.args, graph.kwargs), True, record)

    def _ranks(self, targets: list[tuple[str, nn.Linear]], factors: dict[str, Any]) -> dict[str, int]:
        def at(threshold: float) -> dict[str, int]:
            out = {}
            for name, _ in targets:
                s = factors[name][1]
                cum = torch.cumsum(s**2, 0) / (s**2).sum()
                out[name] = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype) - 1e-12)) + 1
                out[name] = min(out[name], len(s))
            return out

        if self.rank is not None:
            return {name: min(self.rank, len(factors[name][1])) for name, _ in targets}
        if self.param_ratio is None:
            return at(self.energy)
        shapes = {n: tuple(m.weight.shape) for n, m in targets}
        total = sum(o * i for o, i in shapes.values())

        def params(ranks: dict[str, int]) -> int:
            return sum(min(o * i, ranks[n] * (o + i)) for n, (o, i) in shapes.items())

        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if params(at(mid)) <= (1 - self.param_ratio) * total:
                lo = mid
            else:
                hi = mid
        if params(at(lo)) > (1 - self.param_ratio) * total:
            raise BudgetError(f"removing {self.param_ratio:.0%} of the parameters by low rank is not possible")
        return at(lo)

    def _covariances(self, graph: Graph, targets: list[tuple[str, nn.Linear]]) -> dict[str, torch.Tensor]:
        acc: dict[str, torch.Tensor] = {}
        hooks = []
        for name, mod in targets:
            def hook(_m: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
                x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
                acc[name] = acc.get(name, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)) + x.t() @ x

            hooks.append(mod.register_forward_pre_hook(hook))
        run_calibration(graph.module, calibration_calls(graph, self.calib), hooks)
        if not acc:
            raise BudgetError("no calibration input reached the targeted layers")
        return acc

