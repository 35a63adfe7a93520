"""Latency of a dense and a pruned model side by side, in the runtime the user deploys (``secateurs bench``).

Both models run on the same inputs, one after the other, with warm-up runs first; the result is the median
seconds per run of each and their ratio. Checkpoint folders are timed in PyTorch, or exported to ONNX (verified)
and timed in ONNX Runtime, or built into TensorRT engines; ONNX files are timed directly.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateurs.errors import BudgetError, CheckpointError
from secateurs.progress import stage, track

__all__ = ["compare_latency", "example_for", "onnx_feeds"]

RUNTIMES = ("onnxruntime", "torch", "tensorrt")


def example_for(model: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of a Hugging Face model's kind: token ids (text) or pixel values (vision).

    Raises:
        BudgetError: The config says neither a vocabulary nor an image size.

    """
    config = getattr(model, "config", None)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab > 0:
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    size = getattr(config, "image_size", None) or 224
    size = size if isinstance(size, int) else int(size[0])
    channels = int(getattr(config, "num_channels", 3) or 3)
    if config is None:
        raise BudgetError(f"cannot build example inputs for {type(model).__name__}: it has no config")
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}


def onnx_feeds(session: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for an ONNX Runtime session: the first dynamic dim is the batch, the others ``seq_len``.

    Integer inputs get ones (masks) or ids 0 / 1, valid for any vocabulary and token-type table (latency does
    not depend on which tokens run); float inputs get normal noise.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else (batch if i == 0 else seq_len) for i, d in enumerate(inp.shape)]
        if "int" in inp.type:
            dtype = np.int64 if "int64" in inp.type else np.int32
            feeds[inp.name] = (np.ones(shape, dtype) if "mask" in inp.name
                               else rng.integers(0, 2, size=shape).astype(dtype))
        elif "float16" in inp.type:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float16)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _median(fn: Any, warmup: int, runs: int, desc: str) -> float:
    try:
        fn()
    except Exception as exc:  # the runtime rejects the inputs or the model fails: say which
        raise CheckpointError(f"{desc}: the model does not run on the benchmark inputs: {exc}") from exc
    for _ in range(warmup):
        fn()
    samples = []
    for _ in track(range(max(runs, 1)), desc):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _ort_time(path: Path, batch: int, seq_len: int, warmup: int, runs: int, threads: int | None, desc: str) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph classes
        raise CheckpointError(f"ONNX Runtime cannot load '{path}': {exc}") from exc
    feeds = onnx_feeds(session, batch, seq_len)
    return _median(lambda: session.run(None, feeds), warmup, runs, desc)


def _load(folder: Path) -> Any:
    from secateurs.backends.checkpoint import load_pretrained

    if not folder.is_dir():
        raise CheckpointError(f"'{folder}' is neither a checkpoint folder nor an .onnx file")
    return load_pretrained(folder).eval()


def compare_latency(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, runtime: str = "onnxruntime",
                    batch: int = 1, seq_len: int = 128, runs: int = 20, warmup: int = 3,
                    threads: int | None = None) -> dict[str, Any]:
    """Median latency of the dense ``src`` and the pruned ``dst`` (folders or ``.onnx`` files) and the speed-up.

    Raises:
        BudgetError: Unknown runtime, or ONNX files with ``runtime="torch"``.
        CheckpointError: A model cannot be loaded or exported.
        BackendUnavailableError: TensorRT or a GPU is missing for ``runtime="tensorrt"``.

    """
    if runtime not in RUNTIMES:
        raise BudgetError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")
    paths = [Path(src), Path(dst)]
    onnx_files = [p.suffix == ".onnx" for p in paths]
    if any(onnx_files) and not all(onnx_files):
        raise BudgetError("give two checkpoint folders or two .onnx files, not one of each")
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="secateurs-bench-") as tmp:
        for label, path in zip(("dense", "pruned"), paths, strict=True):
            if runtime == "torch":
                if path.suffix == ".onnx":
                    raise BudgetError("--runtime torch needs checkpoint folders, not .onnx files")
                model = _load(path)
                inputs = example_for(model, batch, seq_len)
                if threads:
                    torch.set_num_threads(threads)
                with torch.no_grad():
                    times.append(_median(lambda m=model, x=inputs: m(**x), warmup, runs, f"timing {label}"))
                continue
            onnx_path = path
            if path.suffix != ".onnx":
                from secateurs.backends.onnx import export_onnx

                model = _load(path)
                onnx_path = Path(tmp) / f"{label}.onnx"
                half = runtime == "tensorrt"  # TensorRT 11 takes precision from the file: FP16 for sparse kernels
                with stage(f"exporting {label} to ONNX"):
                    export_onnx(model, example_for(model, min(batch, 2), min(seq_len, 16)), onnx_path,
                                dtype=torch.float16 if half else None, atol=2e-2 if half else 1e-4,
                                rtol=2e-2 if half else 1e-3)
            if runtime == "onnxruntime":
                times.append(_ort_time(onnx_path, batch, seq_len, warmup, runs, threads, f"timing {label}"))
            else:
                from secateurs.backends.tensorrt import build_engine, engine_latency

                engine = Path(tmp) / f"{label}.engine"
                with stage(f"building {label} engine"):
                    # SPARSE_WEIGHTS is harmless on dense weights and lets 2:4 layers pick sparse kernels.
                    build_engine(onnx_path, engine, sparse=True, batch=(1, batch, max(batch, 8)),
                                 dims=(1, seq_len, max(seq_len, 128)))
                import onnxruntime as ort

                feeds = onnx_feeds(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),
                                   batch, seq_len)
                times.append(engine_latency(engine, {k: torch.from_numpy(v) for k, v in feeds.items()},
                                            warmup=warmup, runs=runs) / 1e3)
    return {"runtime": runtime, "batch": batch, "seq_len": seq_len, "runs": runs, "dense": str(src),
            "pruned": str(dst), "dense_s": times[0], "pruned_s": times[1], "speedup": times[0] / times[1]}
