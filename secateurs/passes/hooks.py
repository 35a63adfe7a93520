"""Small helpers for passes that run calibration data and read module inputs / outputs through hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import split_inputs
from secateurs.ir.graph import Graph
from secateurs.progress import track

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Call", "calibration_calls", "first_tensor", "hidden_input", "layer_targets", "run_calibration"]

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


def run_calibration(model: nn.Module, calls: list[Call], handles: Iterable[Any] = ()) -> None:
    """Run every call through ``model`` in eval mode without gradients, then remove ``handles``.

    The model's training mode is restored and the hook handles are removed even when a call fails.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for args, kwargs in track(calls, "calibration"):
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def layer_targets(
    graph: Graph, accept: Callable[[nn.Module], bool], ignore: Iterable[str] = (), include_outputs: bool = False
) -> list[tuple[str, nn.Module]]:
    """Layers accepted by ``accept``, minus ignored ones and (unless asked) output layers.

    ``ignore`` holds module names or prefixes ending in ``.``; output layers are those whose output channels
    reach a graph output (classifier, LM head), read from :class:`DependencyInfo`, and layers sharing their
    weight with an input embedding (a tied LM head).
    """
    from secateurs.ir.depgraph import DependencyInfo

    info = graph.analysis(DependencyInfo)
    outputs = {m for f in info.frozen if f.reason.startswith("graph output") for m in f.members}
    # An LM head tied to the input embedding is an output layer too, though its frozen group may carry the
    # embedding's reason instead (one reason per group); changing it would also change the embedding.
    embeddings = {id(m.weight) for m in graph.module.modules() if isinstance(m, torch.nn.Embedding)}
    skip = tuple(ignore)
    out = []
    for name, mod in graph.module.named_modules():
        if not accept(mod) or any(name == p or (p.endswith(".") and name.startswith(p)) for p in skip):
            continue
        out_dim = 1 if type(mod).__name__ == "Conv1D" else 0
        tied = not isinstance(mod, torch.nn.Embedding) and id(getattr(mod, "weight", None)) in embeddings
        if not include_outputs and (f"{name}.weight[{out_dim}]" in outputs or tied):
            continue
        out.append((name, mod))
    return out
