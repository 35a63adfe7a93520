"""ONNX backend: export a (pruned) model, verify it in ONNX Runtime against PyTorch, time it.

Export uses ``torch.onnx.export`` with the dynamo exporter (torch.export + onnxscript) by default, or the
legacy TorchScript exporter on request; batch (and sequence, for integer token inputs) axes are dynamic where
the model allows. Every export is checked with ``onnx.checker`` and run in ONNX Runtime on the example inputs;
the largest absolute and relative errors against PyTorch are reported, and an export past the tolerance is
refused with the figures (the file is not left behind). Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.backends.files import atomic_file
from secateurs.errors import CheckpointError, VerificationError
from secateurs.frontends.torch_export import ExampleInputs, split_inputs

__all__ = ["OnnxExport", "export_onnx", "ort_latency", "verify_onnx"]

log = logging.getLogger(__name__)
EXPORTERS = ("dynamo", "legacy")


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """Where the model went and how closely ONNX Runtime reproduced PyTorch on the example inputs."""

    path: Path
    exporter: str
    max_abs_error: float
    max_rel_error: float


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Batch dim (and the sequence dim of integer token tensors) of every tensor input, by parameter name."""
    params = list(inspect.signature(model.forward).parameters)
    named = dict(zip(params, args, strict=False))
    named.update(kwargs)
    spec: dict[str, Any] = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            dims = {0: torch.export.Dim.AUTO}
            if value.dim() == 2 and not value.is_floating_point():
                dims[1] = torch.export.Dim.AUTO
            spec[name] = dims
        else:
            spec[name] = None
    return spec


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    dynamic: bool = True,
    opset: int = 18,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    dtype: torch.dtype | None = None,
) -> OnnxExport:
    """Export ``model`` to ``path`` and (by default) verify it in ONNX Runtime.

    A model with sparsity masks still attached is exported from a copy with the masks made permanent, so the
    file holds the sparse weights themselves. With ``dtype`` (``torch.float16`` / ``torch.bfloat16``) a copy of
    the model and its floating-point inputs
    is cast first, so the ONNX file carries that precision (TensorRT 11 takes precision from the file); it is
    verified against the cast PyTorch model.

    Args:
        model: The module (pruned or not).
        example_inputs: A tuple of positional tensors or a dict of keyword tensors.
        path: The ``.onnx`` file to write (atomically).
        exporter: ``"dynamo"`` (torch.export + onnxscript) or ``"legacy"`` (TorchScript).
        dynamic: Dynamic batch / sequence axes.
        opset: ONNX opset for the legacy exporter (the dynamo exporter picks its own).
        verify: Run ``onnx.checker`` and compare ONNX Runtime with PyTorch.
        atol: Absolute tolerance of the comparison.
        rtol: Relative tolerance (of the reference's magnitude).
        dtype: Cast weights and floating inputs to this precision before exporting.

    Raises:
        CheckpointError: The exporter failed (the message says why).
        VerificationError: ONNX Runtime's outputs differ past the tolerance (nothing is left on disk).

    """
    if exporter not in EXPORTERS:
        raise CheckpointError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    out = Path(path)
    args, kwargs = split_inputs(model, example_inputs)
    if torch.nn.utils.prune.is_pruned(model):
        # Attached sparsity masks export as Mul(weight_orig, weight_mask): TensorRT would see a computed
        # tensor, not a 2:4 weight, and the file would carry the mask. Export a copy with the masks applied.
        from secateurs.modeling.outputs import remove_masks

        model = copy.deepcopy(model)
        remove_masks(model)
    if dtype is not None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise CheckpointError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        model = copy.deepcopy(model).to(dtype)
        args, kwargs = torch.utils._pytree.tree_map(
            lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, (args, kwargs))
    was_training = model.training
    model.eval()
    used = exporter
    try:
        with atomic_file(out, suffix=".onnx") as tmp:
            try:
                try:
                    _export_once(model, args, kwargs, tmp, exporter, dynamic, opset)
                except Exception:
                    if exporter != "dynamo" or not _can_use_eager_attention(model):
                        raise
                    # torch's ONNX decomposition of sdpa changes the strides a later view relied on (seen on
                    # transformers' T5 and Swin, pruned or not); the eager attention path exports.
                    log.info("dynamo export failed with %s attention; retrying with eager attention",
                             getattr(model.config, "_attn_implementation", None))
                    with _eager_attention(model):
                        _export_once(model, args, kwargs, tmp, exporter, dynamic, opset)
                    used = "dynamo (eager attention)"
                result = verify_onnx(tmp, model, args, kwargs, atol=atol, rtol=rtol) if verify else (0.0, 0.0)
            except (VerificationError, CheckpointError):
                raise
            except Exception as exc:  # exporters raise many types; all mean "this model did not export"
                raise CheckpointError(f"ONNX export ({exporter}) of {type(model).__name__} failed: {exc}") from exc
    finally:
        model.train(was_training)
    return OnnxExport(out, used, result[0], result[1])


def _export_once(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tmp: Path, exporter: str,
                 dynamic: bool, opset: int) -> None:
    """One ``torch.onnx.export`` of ``model`` into ``tmp`` with ``exporter``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _exportable_experts(model):
            if exporter == "dynamo":
                program = torch.onnx.export(
                    model, args, kwargs=kwargs, dynamo=True, verbose=False,
                    dynamic_shapes=_dynamic_shapes(model, args, kwargs) if dynamic else None,
                )
                assert program is not None
                program.save(str(tmp))
                return
            # TorchScript tracing takes positional tensors only: keyword tensors become positional inputs named
            # after their keywords, other keywords (use_cache=False) stay fixed.
            tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            names = [f"input_{i}" for i in range(len(args))] + list(tensor_kwargs)
            axes = {n: {0: "batch"} for n in names} if dynamic else None
            static = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}
            # Positional-only models export as they are (initializers keep their module names).
            traced = _Positional(model, len(args), list(tensor_kwargs), static) if kwargs else model
            torch.onnx.export(traced, (*args, *tensor_kwargs.values()), str(tmp), dynamo=False,
                              opset_version=opset, input_names=names, dynamic_axes=axes)


def _can_use_eager_attention(model: nn.Module) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl not in (None, "eager") and callable(getattr(model, "set_attn_implementation", None))


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model's attention through its eager (matmul + softmax) path while exporting."""
    current = model.config._attn_implementation  # type: ignore[union-attr]
    model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_implementation(current)  # type: ignore[operator]


@contextlib.contextmanager
def _exportable_experts(model: nn.Module) -> Iterator[None]:
    """Run transformers' fused MoE experts through ``batched_mm`` while exporting.

    transformers 5 runs them through ``grouped_mm`` by default, which has no ONNX conversion; ``batched_mm``
    (each token's expert weights gathered, then a batched matmul) exports as Gather + MatMul. The file is still
    compared with the model as it runs (``grouped_mm``) by :func:`verify_onnx`.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    setter = getattr(model, "set_experts_implementation", None)
    if current in (None, "eager", "batched_mm") or setter is None:
        yield
        return
    from secateurs.modeling.structure import find_moe_blocks

    if not any(b.fused for b in find_moe_blocks(model)):
        yield
        return
    setter("batched_mm")
    try:
        yield
    finally:
        setter(current)


class _Positional(nn.Module):
    """Calls a model with its keyword tensors given positionally (for the TorchScript exporter)."""

    def __init__(self, model: nn.Module, n_args: int, names: list[str], static: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.n_args, self.names, self.static = model, n_args, names, static

    def forward(self, *tensors: Any) -> Any:
        named = dict(zip(self.names, tensors[self.n_args:], strict=True))
        return self.model(*tensors[: self.n_args], **named, **self.static)


def _feeds(session: Any, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    params = list(inspect.signature(model.forward).parameters)
    named = dict(zip(params, args, strict=False))
    named.update(kwargs)
    tensors = [v for v in named.values() if isinstance(v, torch.Tensor)]
    feeds = {}
    for i, inp in enumerate(session.get_inputs()):
        value = named.get(inp.name)
        if not isinstance(value, torch.Tensor):
            value = tensors[i] if i < len(tensors) else None
        if value is None:
            raise VerificationError(f"ONNX input '{inp.name}' has no matching example input")
        feeds[inp.name] = (value.detach().float() if value.dtype == torch.bfloat16 else value.detach()).cpu().numpy()
    return feeds


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> tuple[float, float]:
    """Check ``path`` with ``onnx.checker`` and compare ONNX Runtime with PyTorch on the inputs.

    Returns:
        (max absolute error, max relative error) over all outputs.

    Raises:
        VerificationError: An output differs by more than ``atol + rtol * |reference|`` (figures included).

    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"'{path}' fails onnx.checker: {exc}") from exc
    with torch.no_grad():
        reference = _tensor_leaves(model(*args, **kwargs))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, _feeds(session, model, args, kwargs))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise VerificationError(
            f"ONNX Runtime (CPU) cannot run '{path}': {str(exc).splitlines()[0]}; pass verify=False to skip "
            "the check (e.g. bfloat16 files for TensorRT, which the CPU provider does not run)"
        ) from exc
    if len(outputs) != len(reference):
        raise VerificationError(f"ONNX Runtime returned {len(outputs)} outputs, PyTorch {len(reference)}")
    worst_abs = worst_rel = 0.0
    for i, (got, ref_t) in enumerate(zip(outputs, reference, strict=True)):
        ref = ref_t.detach().float().cpu().numpy()
        if got.shape != ref.shape:
            raise VerificationError(f"output {i}: ONNX Runtime shape {got.shape} != PyTorch {ref.shape}")
        ref = ref.astype(np.float64)
        diff = np.abs(got.astype(np.float64) - ref)
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(ref) + 1e-12)).max(initial=0.0)))
        bad = diff > atol + rtol * np.abs(ref)
        if bad.any():
            raise VerificationError(
                f"output {i}: ONNX Runtime differs from PyTorch at {int(bad.sum())} values "
                f"(max abs {float(diff.max()):.3g}, tolerance atol={atol} rtol={rtol})"
            )
    log.info("ONNX Runtime matches PyTorch: max abs %.3g, max rel %.3g", worst_abs, worst_rel)
    return worst_abs, worst_rel


def ort_latency(path: str | os.PathLike[str], model: nn.Module, example_inputs: ExampleInputs, *,
                warmup: int = 5, runs: int = 30, threads: int | None = None,
                providers: list[str] | None = None) -> float:
    """Median seconds per run of ``path`` in ONNX Runtime (CPU by default; pass CUDA / TensorRT providers)."""
    import onnxruntime as ort

    args, kwargs = split_inputs(model, example_inputs)
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    feeds = _feeds(session, model, args, kwargs)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
