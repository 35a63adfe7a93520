"""Running a module to compare it with another: its output tensors, and its sparsity masks made permanent."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["remove_masks", "snapshot_outputs"]


def _leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def snapshot_outputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The model's output tensors on ``args`` / ``kwargs`` (eval mode, no gradients), detached copies."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [t.detach().clone() for t in _leaves(model(*args, **kwargs))]
    finally:
        model.train(was_training)


def remove_masks(model: nn.Module) -> int:
    """Make attached masks permanent (``weight`` becomes a plain parameter again); returns how many."""
    count = 0
    for mod in model.modules():
        if isinstance(getattr(mod, "weight_mask", None), torch.Tensor) and hasattr(mod, "weight_orig"):
            torch_prune.remove(mod, "weight")
            count += 1
    return count
