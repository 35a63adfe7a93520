"""The mask maths of weight sparsity, on tensors: N:M, unstructured and SparseGPT masks, and the checks.

A weight is read as ``[rows, in]`` (:func:`_as_rows`): every row a vector over input channels, the axis N:M
groups run along (``in_features`` of a linear, axis 1 of a conv with its kernel taps as more rows, axis 0 of
Hugging Face's Conv1D). :mod:`secateurs.passes.sparsity` chooses the layers and statistics and applies these.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from secateurs.errors import BudgetError

__all__ = ["check_nm", "sparsity_of"]


def _is_target(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise BudgetError(f"{type(module).__name__} has no weight tensor")
    return w


def _in_dim(module: nn.Module) -> int:
    """The weight axis that holds input channels."""
    return 0 if type(module).__name__ == "Conv1D" else 1


def _as_rows(w: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The weight as ``[rows, in]``: every row a vector over input channels (conv kernel taps become rows)."""
    if type(module).__name__ == "Conv1D":
        return w.t()
    if w.dim() > 2:
        return w.movedim(1, -1).reshape(-1, w.shape[1])
    return w


def _from_rows(rows: torch.Tensor, like: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if type(module).__name__ == "Conv1D":
        return rows.t()
    if like.dim() > 2:
        shape = [like.shape[0], *like.shape[2:], like.shape[1]]
        return rows.reshape(shape).movedim(-1, 1)
    return rows


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``m - n`` largest of every ``m`` consecutive scores along the last dim (``n`` zeros per group)."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    drop = groups.topk(n, dim=-1, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, drop, False)
    return mask.reshape(rows, cols)


def _unstructured_mask(score: torch.Tensor, ratio: float, per_row: bool) -> torch.Tensor:
    if per_row:
        k = int(round(score.shape[1] * ratio))
        mask = torch.ones_like(score, dtype=torch.bool)
        if k:
            mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        return mask
    k = int(round(score.numel() * ratio))
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        mask[score.reshape(-1).topk(k, largest=False).indices] = False
    return mask.reshape(score.shape)


def _row_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """Remove exactly ``count`` entries, split over the rows as evenly as possible, lowest ``score`` first.

    Every row loses ``count // rows``; the remaining ones go to the rows whose next candidate scores lowest.
    """
    rows, cols = score.shape
    base, extra = divmod(count, rows)
    mask = torch.ones_like(score, dtype=torch.bool)
    if not count:
        return mask
    values, order = score.topk(base + (1 if extra else 0), dim=1, largest=False)  # sorted, lowest first
    if base:
        mask.scatter_(1, order[:, :base], False)
    if extra:
        pick = values[:, base].argsort()[:extra]
        mask[pick, order[pick, base]] = False
    return mask


def _sparsegpt(w: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: tuple[int, int] | None,
               block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on ``w`` ``[rows, in]`` with ``hessian`` ``[in, in]``: (updated weights, keep mask)."""
    w = w.clone().double()
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        hinv1 = hinv[start:end, start:end]
        err = torch.zeros_like(w1)
        score = w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2
        if nm is None:
            mask1 = _unstructured_mask(score, ratio, per_row=True)
        else:
            mask1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                # N:M groups are chosen on the weights as updated so far (the OBS updates move them)
                group = w1[:, i:i + nm[1]] ** 2 / torch.diag(hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1[:, i:i + nm[1]] = _nm_mask(group, nm[0], nm[1])
            q = w1[:, i].clone()
            q[~mask1[:, i]] = 0
            d = hinv1[i, i]
            e = (w1[:, i] - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        keep[:, start:end] = mask1
        w[:, end:] -= err @ hinv[start:end, end:]
    return w, keep


def _weights(model: nn.Module) -> Iterable[tuple[str, nn.Module, torch.Tensor]]:
    for name, mod in model.named_modules():
        if _is_target(mod):
            yield name, mod, _weight(mod).detach()


def check_nm(model: nn.Module, n: int = 2, m: int = 4, names: Iterable[str] | None = None) -> list[str]:
    """One message per targeted weight that breaks the N:M pattern (``names``: only these layers)."""
    wanted = set(names) if names is not None else None
    problems = []
    for name, mod, w in _weights(model):
        if wanted is not None and name not in wanted:
            continue
        rows = _as_rows(w, mod)
        if rows.shape[1] % m:
            problems.append(f"layer '{name}': {rows.shape[1]} input channels, not a multiple of {m}")
            continue
        zeros = (rows.reshape(rows.shape[0], -1, m) == 0).sum(-1)
        bad = int((zeros < n).sum())
        if bad:
            problems.append(f"layer '{name}': {bad} groups of {m} have fewer than {n} zeros")
    return problems


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every linear / conv layer."""
    return {name: float((w == 0).float().mean()) for name, _, w in _weights(model)}
