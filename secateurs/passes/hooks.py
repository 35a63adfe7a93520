"""Small helpers for passes that run calibration data and read module inputs / outputs through hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from secateurs.errors import BudgetError
from secateurs.frontends.torch_export import split_inputs
from secateurs.ir.graph import Graph
from secateurs.modeling.layers import hidden_input
from secateurs.progress import track

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Call", "calibration_calls", "first_tensor", "hidden_input", "layer_targets", "output_heads",
           "run_calibration", "select_layers"]

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
    """Layers accepted by ``accept``, minus ignored ones and (unless asked) output heads (see :func:`select_layers`)."""
    return select_layers(graph, accept, ignore, include_outputs)[0]


def select_layers(
    graph: Graph, accept: Callable[[nn.Module], bool], ignore: Iterable[str] = (), include_outputs: bool = False
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Layers accepted by ``accept``, and the accepted layers left out with the reason.

    Left out: ``ignore`` (module names or prefixes ending in ``.``) and, unless ``include_outputs``, the real
    heads: a layer that computes a graph output with no parametrised op after it (an LM head, a classifier, a
    pooler; see :func:`output_heads`) and a layer sharing its weight with an input embedding (a tied LM head).
    A layer writing into a residual stream that is returned after a norm is not a head.
    """
    embeddings = {id(m.weight) for m in graph.module.modules() if isinstance(m, torch.nn.Embedding)}
    heads = output_heads(graph) if not include_outputs else {}
    skip = tuple(ignore)
    out: list[tuple[str, nn.Module]] = []
    left: list[tuple[str, str]] = []
    for name, mod in graph.module.named_modules():
        if not accept(mod):
            continue
        if any(name == p or (p.endswith(".") and name.startswith(p)) or name.startswith(p + ".") for p in skip):
            left.append((name, "ignored by the user"))
            continue
        tied = not isinstance(mod, torch.nn.Embedding) and id(getattr(mod, "weight", None)) in embeddings
        if not include_outputs and tied:
            left.append((name, "weight tied to the input embedding"))
        elif name in heads:
            left.append((name, heads[name]))
        else:
            out.append((name, mod))
    return out, left


def output_heads(graph: Graph) -> dict[str, str]:
    """Modules whose outputs reach a graph output through parameter-free ops only, with the reason.

    Walking forward from a module's own parameters, a path stops at the first op that reads another
    parameter (the next layer, or a norm's weight); a path that reaches the graph's output makes the module a
    head (``lm_head``, a classifier, a pooler). In a model that returns its residual stream after a final
    norm, the layers writing into that stream are not heads.
    """
    from torch import fx

    params = graph.params
    owners: dict[str, list[fx.Node]] = {}
    for node in graph.nodes():
        if node.op == "placeholder" and node.name in params:
            owners.setdefault(params[node.name].rpartition(".")[0], []).append(node)
    output = next((n for n in graph.nodes() if n.op == "output"), None)
    position: dict[fx.Node, int] = {}
    if output is not None:
        outs = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        position = {o: i for i, o in enumerate(outs) if isinstance(o, fx.Node)}
    heads: dict[str, str] = {}
    for module, own in owners.items():
        mine = set(own)
        seen: set[fx.Node] = set()
        frontier = [u for p in own for u in p.users]
        while frontier:
            node = frontier.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.op == "output":
                continue
            if any(a.op == "placeholder" and a.name in params and a not in mine for a in node.all_input_nodes):
                continue
            if node in position:
                heads[module] = f"output head: computes graph output #{position[node]} with no parametrised layer after it"
                break
            frontier.extend(node.users)
    return heads
