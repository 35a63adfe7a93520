"""Write a (pruned) ONNX graph to disk: checked, atomic, nothing left behind on error.

Before writing, initializers that ended up identical are merged again (the frontend gave each use of a
shared initializer its own copy). The model is written to a temporary folder next to the destination, checked
there with ``onnx.checker.check_model(full_check=True)`` (which runs strict shape inference) and, optionally,
run once in ONNX Runtime on inputs of the analysis shapes; only then is it moved into place with
``os.replace``. Models over 2 GB are written with their weights in ``<name>.data`` next to the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from secateurs.backends.files import atomic_dir, publish
from secateurs.errors import CheckpointError, VerificationError
from secateurs.ir.onnx_graph import OnnxGraph

__all__ = ["compare_outputs", "run_onnx", "run_onnx_model", "save_onnx"]

log = logging.getLogger(__name__)

_EXTERNAL_BYTES = 1_800_000_000


def _tensor_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += int(value.const_value.nbytes)
    return total


def save_onnx(
    graph: OnnxGraph,
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    run_inputs: Mapping[str, Sequence[int]] | None = None,
    expect: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write ``graph`` to ``path`` atomically.

    Args:
        graph: The ONNX graph (pruned or not).
        path: The destination ``.onnx`` file; an existing file is replaced only once the new one is checked.
        check: Run ``onnx.checker.check_model(full_check=True)`` on the written file.
        run_inputs: When given (input name -> static shape), also run the file once in ONNX Runtime on inputs of
            these shapes and check that it runs.
        expect: The outputs that run must give (the masked dense model's, see :func:`compare_outputs`).

    Returns:
        The path written.

    Raises:
        VerificationError: The model fails the checker or does not run (nothing is left on disk).
        CheckpointError: The file cannot be written.

    """
    out = Path(path)
    model = graph.model
    ir_passes.RemoveUnusedNodesPass()(model)
    dedupe = getattr(ir_passes, "DeduplicateHashedInitializersPass", ir_passes.DeduplicateInitializersPass)
    dedupe()(model)
    external = _tensor_bytes(model) > _EXTERNAL_BYTES
    data_name = f"{out.name}.data"
    with atomic_dir(out) as tmp_dir:
        tmp = tmp_dir / out.name
        try:
            if external:
                ir.save(model, tmp, external_data=data_name)
            else:
                ir.save(model, tmp)
        except Exception as exc:  # serialisation or I/O errors of many types
            raise CheckpointError(f"cannot write '{out}': {exc}") from exc
        if check:
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except Exception as exc:  # ValidationError / InferenceError
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise VerificationError(f"the rewritten model fails onnx.checker (full check): {first}") from exc
        if run_inputs is not None:
            got = run_onnx(tmp, run_inputs)
            if expect is not None:
                compare_outputs(expect, got)
        publish(tmp_dir)
        if external:
            os.replace(tmp_dir / data_name, out.parent / data_name)
        os.replace(tmp, out)
    log.info("wrote '%s'", out)
    return out


def compare_outputs(want: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> None:
    """The pruned file's outputs must equal the masked dense model's (relative norm error 1e-3, 3e-2 in fp16).

    Raises:
        VerificationError: An output differs; the rewrite changed what the graph computes (nothing is written).

    """
    if len(want) != len(got):
        raise VerificationError(f"the rewritten model returns {len(got)} outputs, the dense one {len(want)}")
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            raise VerificationError(f"output #{i} changed shape from {a.shape} to {b.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            if not np.array_equal(a, b):
                raise VerificationError(f"output #{i} of the rewritten model differs from the masked dense model's")
            continue
        x, y = a.astype(np.float64), b.astype(np.float64)
        err, scale = float(np.linalg.norm(y - x)), float(max(np.linalg.norm(x), np.linalg.norm(y)))
        tol = 3e-2 if a.dtype == np.float16 else 1e-3
        if not err <= tol * scale + 1e-6 * np.sqrt(max(x.size, 1)):
            raise VerificationError(
                f"output #{i} of the rewritten model differs from the dense model with the removed channels "
                f"zeroed (relative error {err / max(scale, 1e-30):.3g}): the graph holds something that reads "
                "channels the rewrite did not follow; nothing was written")


def run_onnx_model(model: ir.Model, shapes: Mapping[str, Sequence[int]],
                   extra: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run an in-memory model once in ONNX Runtime, on the inputs :func:`run_onnx` uses (and ``extra``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path)
        return run_onnx(path, shapes, extra)


def run_onnx(path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]],
             extra: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run ``path`` once in ONNX Runtime (CPU) on deterministic inputs of ``shapes`` and return the outputs.

    Floating inputs are drawn from a fixed-seed normal distribution, integer inputs are ones (a valid token id
    and an all-ones attention mask), booleans are True; inputs named in ``extra`` take its arrays instead (and
    draw nothing, so the other inputs are the same with or without them).

    Raises:
        VerificationError: ONNX Runtime cannot load or run the file.

    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {}
        rng = np.random.default_rng(0)
        for inp in session.get_inputs():
            if extra is not None and inp.name in extra:
                feeds[inp.name] = extra[inp.name]
                continue
            shape = tuple(shapes[inp.name])
            kind = inp.type
            if "float" in kind or "double" in kind:
                ftype = np.float16 if "float16" in kind else (np.float64 if "double" in kind else np.float32)
                feeds[inp.name] = rng.standard_normal(shape).astype(ftype)
            elif "bool" in kind:
                feeds[inp.name] = np.ones(shape, dtype=bool)
            else:
                feeds[inp.name] = np.ones(shape, dtype=np.int32 if "int32" in kind else np.int64)
        return [np.asarray(o) for o in session.run(None, feeds)]
    except KeyError as exc:
        raise VerificationError(f"no shape for ONNX input {exc} of '{path}'") from exc
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"ONNX Runtime cannot run the rewritten model: {first}") from exc
