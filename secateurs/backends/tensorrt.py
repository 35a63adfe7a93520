"""TensorRT backend: build engines from ONNX files (FP16, 2:4 sparse weights, dynamic shapes), run and time them.

Needs the ``tensorrt`` package (``pip install secateurs[trt]``) and an NVIDIA GPU; without them every entry point
raises :class:`~secateurs.errors.BackendUnavailableError` with the reason. ``tensorrt`` is imported only inside
the functions, so the rest of secateurs works without it.

TensorRT 10 and 11 are both supported by feature detection, not version strings: where ``BuilderFlag.FP16``
exists (10.x), ``fp16=True`` sets it on a weakly typed network; where it does not (11.x, always strongly typed),
precision comes from the ONNX file, so export with ``export_onnx(..., dtype=torch.float16)``. A file that
already carries FP16 / BF16 is built strongly typed on both.

With ``sparse=True`` the builder may pick 2:4 sparse kernels for weights that follow the pattern along the axis
TensorRT expects (:func:`secateurs.backends.onnx_checks.sparsity_layout` checks that without a GPU); TensorRT
reports which layers were eligible and which it picked (it keeps a dense kernel where that is faster), and the
:class:`EngineBuild` carries both lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from secateurs.backends.files import atomic_file
from secateurs.errors import BackendUnavailableError, CheckpointError

__all__ = ["EngineBuild", "EngineLayer", "build_engine", "engine_latency", "run_engine"]

log = logging.getLogger(__name__)

ShapeMap = Mapping[str, Sequence[int]]
_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:\s*(.*)")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:\s*(.*)")
_HALF_TYPES = (10, 16)  # ONNX FLOAT16, BFLOAT16


@dataclasses.dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine as the engine inspector reports it."""

    name: str
    layer_type: str
    tactic: str


@dataclasses.dataclass(frozen=True)
class EngineBuild:
    """A built engine: where it is, how long the build took, its precision mode and its (sparse) layers.

    ``sparse_eligible`` are the layers TensorRT found with 2:4 weights; ``sparse_layers`` those it runs with a
    sparse kernel (from its build log and the inspector's tactic names). Both are empty without ``sparse=True``.
    """

    path: Path
    build_seconds: float
    precision: str
    sparse_eligible: tuple[str, ...]
    sparse_layers: tuple[str, ...]
    layers: tuple[EngineLayer, ...]
    timing_cache: Path | None


def _tensorrt() -> Any:
    """Import TensorRT and check for a CUDA GPU, or raise :class:`BackendUnavailableError` saying which is missing."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but its CUDA libraries are not
        raise BackendUnavailableError(f"TensorRT is not installed: pip install secateurs[trt] ({exc})") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "no CUDA GPU: TensorRT builds and runs engines only on an NVIDIA GPU (torch.cuda.is_available() is "
            "False); the ONNX checks in secateurs.backends.onnx_checks work without one")
    return trt


def _logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to :mod:`logging` and keeps the lines the sparsity report needs."""

    class _Collect(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(msg)
                log.warning("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.info("TensorRT: %s", msg)
            elif severity == sev.VERBOSE and "parsity" not in msg:
                return
            else:
                log.debug("TensorRT: %s", msg)
            self.lines.append(msg)

    return _Collect()


def _onnx_inputs(onnx_path: Path) -> list[tuple[str, list[int | str | None], int]]:
    """(name, dims, elem type) of the graph inputs; a dim is an int, a symbol name, or None (unknown)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    found = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tt.shape.dim
        ]
        found.append((inp.name, dims, tt.elem_type))
    return found


def _file_is_half(onnx_path: Path) -> bool:
    """Whether the file carries FP16 / BF16 tensors (graph inputs or initializers)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(t.data_type in _HALF_TYPES for t in model.graph.initializer) or any(
        i.type.tensor_type.elem_type in _HALF_TYPES for i in model.graph.input)


def _profile_shapes(
    inputs: list[tuple[str, list[int | str | None], int]],
    min_shapes: ShapeMap | None,
    opt_shapes: ShapeMap | None,
    max_shapes: ShapeMap | None,
    batch: tuple[int, int, int],
    dims: tuple[int, int, int],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input with a dynamic dim.

    Given shapes win; a dynamic dim not given takes the value the same symbolic dim has in a given shape of
    another input, else ``batch`` (axis 0) or ``dims`` (other axes). Static dims keep their size.
    """
    given = (dict(min_shapes or {}), dict(opt_shapes or {}), dict(max_shapes or {}))
    names = {name for name, _, _ in inputs}
    for kind in given:
        unknown = set(kind) - names
        if unknown:
            raise CheckpointError(f"no ONNX input(s) {sorted(unknown)}; the inputs are {sorted(names)}")
    symbols: list[dict[str, int]] = [{}, {}, {}]
    for k, kind in enumerate(given):
        for name, file_dims, _ in inputs:
            if name not in kind:
                continue
            shape = tuple(int(v) for v in kind[name])
            if len(shape) != len(file_dims):
                raise CheckpointError(f"shape {list(shape)} for input '{name}' has rank {len(shape)}; the ONNX "
                                      f"input has rank {len(file_dims)}")
            for d, v in zip(file_dims, shape, strict=True):
                if isinstance(d, int) and d != v:
                    raise CheckpointError(f"shape {list(shape)} for input '{name}' changes its static dims "
                                          f"{file_dims}")
                if isinstance(d, str):
                    symbols[k].setdefault(d, v)
    profiles = {}
    for name, file_dims, _ in inputs:
        if all(isinstance(d, int) for d in file_dims):
            continue
        triple: list[tuple[int, ...]] = []
        for k, kind in enumerate(given):
            if name in kind:
                triple.append(tuple(int(v) for v in kind[name]))
                continue
            derived: list[int] = []
            for axis, d in enumerate(file_dims):
                if isinstance(d, int):
                    derived.append(d)
                elif isinstance(d, str) and d in symbols[k]:
                    derived.append(symbols[k][d])
                else:
                    derived.append((batch if axis == 0 else dims)[k])
            triple.append(tuple(derived))
        lo, mid, hi = triple
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)) or min(lo, default=1) < 0:
            raise CheckpointError(f"input '{name}': need min <= opt <= max, got {list(lo)}, {list(mid)}, {list(hi)}")
        profiles[name] = (lo, mid, hi)
    return profiles


def _parse_sparsity_log(lines: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(eligible, picked) layer names from TensorRT's "(Sparsity)" build log lines."""
    eligible: list[str] = []
    picked: list[str] = []
    for line in lines:
        for pattern, into in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            m = pattern.search(line)
            if m:
                into.extend(n.strip() for n in m.group(1).split(",") if n.strip() and n.strip() not in into)
    return tuple(eligible), tuple(picked)


def _parse_inspector(text: str) -> tuple[EngineLayer, ...]:
    """Layers from the engine inspector's JSON (detailed: dicts with tactic names; names-only: strings)."""
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return ()
    layers = []
    for entry in info.get("Layers", []) if isinstance(info, dict) else []:
        if isinstance(entry, str):
            layers.append(EngineLayer(entry, "", ""))
        elif isinstance(entry, dict):
            layers.append(EngineLayer(str(entry.get("Name", "")), str(entry.get("LayerType", "")),
                                      str(entry.get("TacticName", entry.get("TacticValue", "")))))
    return tuple(layers)


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or a buffer such as TensorRT's IHostMemory) to ``path`` via a temporary file and a rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    sparse: bool = False,
    min_shapes: ShapeMap | None = None,
    opt_shapes: ShapeMap | None = None,
    max_shapes: ShapeMap | None = None,
    batch: tuple[int, int, int] = (1, 1, 8),
    dims: tuple[int, int, int] = (1, 128, 512),
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_gb: float = 4.0,
    strongly_typed: bool | None = None,
    optimization_level: int | None = None,
) -> EngineBuild:
    """Build a TensorRT engine from ``onnx_path`` and save it to ``engine_path`` (atomically).

    Args:
        onnx_path: The ``.onnx`` file (e.g. from :func:`secateurs.backends.onnx.export_onnx`).
        engine_path: Where the serialized engine goes (nothing is left there if the build fails).
        fp16: Allow FP16 kernels. TensorRT 10: sets ``BuilderFlag.FP16``. TensorRT 11 (no such flag): the file
            must carry FP16 already (``export_onnx(..., dtype=torch.float16)``).
        sparse: Set ``BuilderFlag.SPARSE_WEIGHTS`` so 2:4 weights may run on sparse tensor cores.
        min_shapes: Smallest shape per input name (inputs with dynamic dims only).
        opt_shapes: The shape per input that kernels are tuned for.
        max_shapes: Largest shape per input name.
        batch: Default (min, opt, max) of a dynamic axis 0 for inputs not given above.
        dims: Default (min, opt, max) of other dynamic axes (e.g. sequence length) for inputs not given above; a
            symbolic dim shared with a given input takes that input's value.
        timing_cache: A timing-cache file: loaded if it exists (later builds of similar layers are faster) and
            saved (atomically) after the build.
        workspace_gb: The builder's workspace memory limit in GiB.
        strongly_typed: Build a strongly typed network (precision from the file). Default: when the file carries
            FP16 / BF16, or when this TensorRT has no FP16 builder flag.
        optimization_level: TensorRT's builder optimization level (0-5; lower builds faster, default 3).

    Returns:
        The :class:`EngineBuild`.

    Raises:
        BackendUnavailableError: TensorRT is not installed or there is no CUDA GPU.
        CheckpointError: The ONNX file is missing, does not parse, the shapes do not fit it, or the build failed
            (TensorRT's errors are in the message).

    """
    trt = _tensorrt()
    src, out = Path(onnx_path), Path(engine_path)
    if not src.is_file():
        raise CheckpointError(f"ONNX file '{src}' does not exist")
    profiles = _profile_shapes(_onnx_inputs(src), min_shapes, opt_shapes, max_shapes, batch, dims)
    half_file = _file_is_half(src)
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if fp16 and not has_fp16_flag and not half_file:
        raise CheckpointError(
            f"this TensorRT is strongly typed (no FP16 builder flag): precision comes from the file, and '{src}' "
            "is FP32; export it with export_onnx(..., dtype=torch.float16)")
    typed = strongly_typed if strongly_typed is not None else (half_file or not has_fp16_flag)
    if sparse:
        _warn_unsparsifiable(src)

    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    if not hasattr(creation, "STRONGLY_TYPED") and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)  # TensorRT < 9 needs it for ONNX; later ones ignore it
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse '{src}': {errors or 'no details'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if fp16 and has_fp16_flag and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    dynamic = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in dynamic if any(d < 0 for d in t.shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            if tensor.name not in profiles:
                raise CheckpointError(f"TensorRT input '{tensor.name}' is dynamic but has no shape range")
            profile.set_shape(tensor.name, *profiles[tensor.name])
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a corrupt cache, or one written by another TensorRT / GPU: time the tactics afresh
        log.warning("timing cache '%s' is unreadable or from another TensorRT / GPU; starting an empty one",
                    cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise CheckpointError(f"TensorRT failed to build an engine from '{src}': "
                              f"{'; '.join(logger.errors[-5:]) or 'no error logged'}")
    _write_atomic(out, serialized)
    if cache_path is not None:
        _write_atomic(cache_path, config.get_timing_cache().serialize())

    layers: tuple[EngineLayer, ...] = ()
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        inspector = engine.create_engine_inspector()
        layers = _parse_inspector(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # inspection is a report, not part of the build: never fail the build for it
        log.warning("cannot inspect the engine's layers: %s", exc)
    eligible, picked = _parse_sparsity_log(logger.lines)
    by_tactic = [lay.name for lay in layers if "sparse" in lay.tactic.lower()] if sparse else []
    sparse_layers = picked + tuple(n for n in by_tactic if n not in picked)
    precision = ("from the file (strongly typed)" if typed else "fp16 (builder flag)" if fp16 else "fp32 / tf32")
    log.info("built '%s' in %.1f s (%s); %d of %d sparse-eligible layers run sparse", out, seconds, precision,
             len(sparse_layers), len(eligible))
    return EngineBuild(out, seconds, precision, eligible, sparse_layers, layers, cache_path)


def _warn_unsparsifiable(src: Path) -> None:
    """Log the weights TensorRT will not see as 2:4 constants (computed ones: fold them first)."""
    from secateurs.backends.onnx_checks import sparsity_layout

    computed = [lay.describe() for lay in sparsity_layout(src) if lay.status == "computed"]
    for line in computed:
        log.warning("%s", line)


_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
           "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    for name, torch_dtype in _DTYPES.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise CheckpointError(f"engine tensor type {dtype} has no torch equivalent here")


class _Bound:
    """An engine with an execution context whose inputs and outputs are bound to CUDA tensors."""

    def __init__(self, trt: Any, engine_path: Path, inputs: Mapping[str, Any] | Sequence[Any]) -> None:
        if not engine_path.is_file():
            raise CheckpointError(f"engine file '{engine_path}' does not exist")
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise CheckpointError(f"TensorRT cannot load engine '{engine_path}' (built by another TensorRT version "
                                  f"or GPU?): {'; '.join(self.logger.errors[-3:])}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        in_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if isinstance(inputs, Mapping):
            missing = [n for n in in_names if n not in inputs]
            if missing:
                raise CheckpointError(f"no value for engine input(s) {missing}; given {sorted(inputs)}")
            values = [inputs[n] for n in in_names]
        else:
            if len(inputs) != len(in_names):
                raise CheckpointError(f"the engine takes {len(in_names)} inputs {in_names}, got {len(inputs)}")
            values = list(inputs)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, value in zip(in_names, values, strict=True):
            t = torch.as_tensor(value).to("cuda", _torch_dtype(trt, self.engine.get_tensor_dtype(name)))
            t = t.contiguous()
            self.tensors[name] = t
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise CheckpointError(f"input '{name}' shape {list(t.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, t.data_ptr())
        self.outputs: dict[str, torch.Tensor] = {}
        for name in names:
            if name in self.tensors:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CheckpointError(f"output '{name}' has a data-dependent shape {list(shape)}; not supported here")
            out = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device="cuda")
            self.outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())  # the input copies above ran on the current stream

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CheckpointError(f"TensorRT execution failed: {'; '.join(self.logger.errors[-3:])}")


def run_engine(engine_path: str | os.PathLike[str],
               inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, torch.Tensor]:
    """Run an engine once and return its outputs (CUDA tensors, by output name).

    Args:
        engine_path: A file written by :func:`build_engine`.
        inputs: Tensors (or arrays) by input name, or in the engine's input order; they are moved to the GPU and
            cast to the engine's input types.

    Raises:
        BackendUnavailableError: TensorRT is not installed or there is no CUDA GPU.
        CheckpointError: The engine does not load, or the inputs do not fit it.

    """
    bound = _Bound(_tensorrt(), Path(engine_path), inputs)
    bound()
    bound.stream.synchronize()
    return bound.outputs


def engine_latency(engine_path: str | os.PathLike[str], inputs: Mapping[str, Any] | Sequence[Any], *,
                   warmup: int = 10, runs: int = 50) -> float:
    """Median milliseconds per run of an engine on ``inputs`` (CUDA events around ``execute_async_v3``).

    Args:
        engine_path: A file written by :func:`build_engine`.
        inputs: As for :func:`run_engine`; they stay on the GPU between runs (no copies are timed).
        warmup: Untimed runs first.
        runs: Timed runs.

    Raises:
        BackendUnavailableError: TensorRT is not installed or there is no CUDA GPU.
        CheckpointError: The engine does not load, or the inputs do not fit it.

    """
    bound = _Bound(_tensorrt(), Path(engine_path), inputs)
    for _ in range(warmup):
        bound()
    bound.stream.synchronize()
    times = []
    for _ in range(max(runs, 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(bound.stream)
        bound()
        end.record(bound.stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
