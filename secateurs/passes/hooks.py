"""Small helpers for passes that run calibration data and read module inputs / outputs through hooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import split_inputs
from secateurs.ir.graph import Graph

__all__ = ["Call", "calibration_calls", "first_tensor", "hidden_input"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


def calibration_calls(graph: Graph, calib: Iterable[Any] | None) -> list[Call]:
    """``(args, kwargs)`` for every calibration batch, or the capture's example inputs when ``calib`` is None.

    Raises:
        BudgetError: ``calib`` is empty.

    """
    if calib is None:
        return [(graph.args, graph.kwargs)]
    calls = [split_inputs(graph.module, batch) for batch in calib]
    if not calls:
        raise BudgetError("calibration data is empty")
    return calls


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
