"""Small helpers for passes that read module inputs and outputs through forward hooks."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["first_tensor", "hidden_input"]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor itself, or the first element of a tuple / list output (Hugging Face's ``(hidden, ...)``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A module call's hidden states: the ``hidden_states`` keyword, else the first tensor argument."""
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next(a for a in args if isinstance(a, torch.Tensor))
