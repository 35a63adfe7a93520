"""Capture a PyTorch module into the IR with ``torch.export`` (non-strict, ATen training IR)."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from secateurs.errors import CaptureError
from secateurs.frontends.record import RecordError, record_call
from secateurs.ir.graph import Graph

__all__ = ["CAPTURE_METHODS", "ExampleInputs", "capture", "capture_call", "split_inputs"]

log = logging.getLogger(__name__)

ExampleInputs = tuple[Any, ...] | Mapping[str, Any] | torch.Tensor


def split_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise example inputs to ``(args, kwargs)``.

    A tensor becomes a 1-tuple, a mapping becomes keyword inputs. ``use_cache=False`` is added for models
    whose ``forward`` takes ``use_cache`` (Hugging Face decoders), or passes ``**kwargs`` on and has a config
    with ``use_cache``, because KV caches do not export.

    Raises:
        CaptureError: The inputs are neither a tensor, a tuple nor a mapping.

    """
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
        kwargs: dict[str, Any] = {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise CaptureError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"not {type(example_inputs).__name__}"
        )
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hf_config = isinstance(getattr(getattr(model, "config", None), "use_cache", None), bool)
    if "use_cache" not in kwargs and ("use_cache" in params or (takes_kwargs and hf_config)):
        kwargs["use_cache"] = False  # a decoder whose forward passes **kwargs on to its base model too
    return args, kwargs


def capture(model: nn.Module, example_inputs: ExampleInputs) -> Graph:
    """Capture ``model`` called on ``example_inputs`` into a :class:`Graph`.

    The model is traced in eval mode (its mode is restored afterwards) with fake tensors, so no real
    computation runs. Parameters keep their module names.

    Args:
        model: Any ``nn.Module``.
        example_inputs: A tuple of positional tensors, a dict of keyword tensors, or one tensor.

    Returns:
        The captured graph.

    Raises:
        CaptureError: ``torch.export`` could not trace the model; the message says why and what to try.

    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(model, example_inputs)
    return capture_call(model, args, kwargs)


CAPTURE_METHODS = ("auto", "record", "export")


def capture_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], method: str = "auto", *,
                 keep_values: bool = False) -> Graph:
    """Capture ``model(*args, **kwargs)``; see :func:`capture`.

    Args:
        model: The module (traced in eval mode, its mode restored afterwards).
        args: Positional example inputs.
        kwargs: Keyword example inputs.
        method: ``"record"``: record one eager forward (:mod:`secateurs.frontends.record`, tens of times faster);
            ``"export"``: ``torch.export``; ``"auto"`` (default): record, and export where recording refuses the
            model or its forward fails.
        keep_values: When recorded, keep every node's value (``Graph.values``).

    Raises:
        CaptureError: The model could not be captured; the message says why and what to try.

    """
    if method not in CAPTURE_METHODS:
        raise CaptureError(f"unknown capture method {method!r}; choose one of {', '.join(CAPTURE_METHODS)}")
    was_training = model.training
    model.eval()
    try:
        return _record_or_export(model, args, kwargs, method, keep_values)
    finally:
        model.train(was_training)


def _record_or_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], method: str,
                      keep_values: bool) -> Graph:
    """:func:`capture_call` on a module already in eval mode."""
    if method != "export":
        try:
            rec = record_call(model, args, kwargs, keep_values=keep_values)
        except RecordError as exc:
            if method == "record":
                raise CaptureError(f"cannot record {type(model).__name__}: {exc}") from exc
            log.info("recording %s failed (%s); capturing it with torch.export", type(model).__name__, exc)
        except Exception as exc:  # the model's own forward failed on these inputs
            if method == "record":
                raise CaptureError(_explain(model, exc, "the forward failed on the example inputs")) from exc
            log.info("the forward of %s failed (%s); trying torch.export", type(model).__name__, exc)
        else:
            log.debug("recorded %s: %d nodes", type(model).__name__, len(rec.program.graph.nodes))
            return Graph(module=model, program=rec.program, args=args, kwargs=kwargs, params=rec.params,
                         buffers=rec.buffers, constants=rec.constants, user_inputs=rec.user_inputs,
                         user_outputs=rec.user_outputs, capture="record", outputs=rec.outputs, values=rec.values)
    return _export_call(model, args, kwargs)


def _export_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Graph:
    # Fake-tensor failures are reported through CaptureError; torch would also log them at ERROR level.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # torch.nn.utils.prune's pre-hooks assign ``weight`` during forward (sparsity masks): expected here
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; all mean "not capturable"
        raise CaptureError(_explain(model, exc)) from exc
    finally:
        fake_log.setLevel(level)
    sig = program.graph_signature
    params: dict[str, str] = {}
    buffers: dict[str, str] = {}
    constants: dict[str, str] = {}
    user_inputs: list[str] = []
    for spec in sig.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        if spec.kind == InputKind.PARAMETER:
            params[name] = str(spec.target)
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = str(spec.target)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ, InputKind.TOKEN):
            constants[name] = str(spec.target)
        else:
            user_inputs.append(name)
    user_outputs = [
        str(getattr(spec.arg, "name", ""))
        for spec in sig.output_specs
        if spec.kind != OutputKind.TOKEN and getattr(spec.arg, "name", None) is not None
    ]
    log.debug("captured %s: %d nodes", type(model).__name__, len(program.graph.nodes))
    return Graph(
        module=model,
        program=program,
        args=args,
        kwargs=kwargs,
        params=params,
        buffers=buffers,
        constants=constants,
        user_inputs=user_inputs,
        user_outputs=user_outputs,
    )


def _explain(model: nn.Module, exc: Exception, what: str = "torch.export could not trace the model") -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = (
        f"{what}. Common causes: Python control flow that depends on tensor "
        "values (rewrite it with torch.where / torch.cond), .item() or .tolist() in forward, inputs that do "
        "not match forward's signature, or a KV cache (pass use_cache=False)."
    )
    return f"cannot capture {type(model).__name__}: {type(exc).__name__}: {first}\n{hint}"
