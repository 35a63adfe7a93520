"""Measured latency tables: what one channel of each group costs in time on the chosen backend.

Each linear / conv layer that a group slices is timed at its full size and with the sliced dimension halved,
on its real input shape (recorded with one forward pass), on PyTorch CPU or in ONNX Runtime (CPU execution
provider, the layer exported alone); the slope is the time one position saves. A group's latency per channel
is the sum over its member layers of slope x positions per channel. An ONNX graph is measured the same way in
ONNX Runtime: each MatMul / Gemm / Conv node that a group's initializer feeds is run alone, at the analysis
shapes, with the sliced dimension at full and half size. Timings are cached in a JSON file keyed by backend,
torch version, thread count, layer type and shapes, so a second run (or a second model with the same layer
shapes) measures nothing.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import BudgetError
from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph

__all__ = ["LatencyTable", "default_cache"]

BACKENDS = ("torch", "onnxruntime")


def default_cache() -> Path:
    """``$SECATEURS_CACHE/latency.json``, else ``~/.cache/secateurs/latency.json``."""
    root = os.environ.get("SECATEURS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "secateurs")
    return Path(root) / "latency.json"


def _time(fn: Any, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class LatencyTable:
    """Per-layer timings at full and reduced width, cached on disk.

    Args:
        backend: ``"torch"`` (PyTorch CPU) or ``"onnxruntime"`` (CPU execution provider; needs the ``onnx``
            extra), both with the current torch thread count.
        cache: JSON cache file (``None``: :func:`default_cache`).
        repeats: Timed runs per measurement (median).

    """

    def __init__(self, backend: str = "torch", cache: str | os.PathLike[str] | None = None, repeats: int = 15) -> None:
        if backend not in BACKENDS:
            raise BudgetError(f"latency backend {backend!r} is not available; choose from {BACKENDS}")
        self.backend = backend
        self.path = Path(cache) if cache is not None else default_cache()
        self.repeats = repeats
        self.measured = 0
        try:
            self.entries: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:
            self.entries = {}

    def _key(self, *parts: Any) -> str:
        return "|".join(str(p) for p in (self.backend, torch.__version__, torch.get_num_threads(), *parts))

    def layer(self, module: nn.Module, in_shape: tuple[int, ...], dim: int, size: int) -> float:
        """Seconds for one forward of a layer like ``module`` with its weight's ``dim`` set to ``size``."""
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise BudgetError(f"cannot time {type(module).__name__}: no weight")
        shape = list(w.shape)
        shape[dim] = size
        x_shape = list(in_shape)
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            in_dim = 1 if isinstance(module, nn.Linear) else 0
            if dim == in_dim:
                x_shape[-1] = size
        elif isinstance(module, nn.modules.conv._ConvNd) and dim == 1:
            x_shape[1] = size * module.groups
        key = self._key(type(module).__name__, tuple(shape), tuple(x_shape), getattr(module, "stride", ""),
                        getattr(module, "padding", ""), getattr(module, "groups", 1))
        if key not in self.entries and self.backend == "onnxruntime":
            self.entries[key] = self._ort_layer(module, shape, x_shape)
            self.measured += 1
        if key not in self.entries:
            weight = torch.randn(shape)
            x = torch.randn(x_shape)
            if isinstance(module, nn.Linear):
                def fn() -> Any:
                    return torch.nn.functional.linear(x, weight)
            elif isinstance(module, nn.modules.conv._ConvNd):
                conv = module._conv_forward  # type: ignore[operator]

                def fn() -> Any:
                    return conv(x, weight, None)
            else:  # Hugging Face Conv1D: x @ W with W [in, out]
                def fn() -> Any:
                    return x.reshape(-1, x.shape[-1]) @ weight
            self.entries[key] = _time(fn, self.repeats)
            self.measured += 1
        return self.entries[key]

    def _ort_layer(self, module: nn.Module, shape: list[int], x_shape: list[int]) -> float:
        """Time one layer of the given weight shape in ONNX Runtime."""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            # same stride / padding / groups; forward reads only the weight's shape
            layer: nn.Module = copy.deepcopy(module)
            layer.weight = nn.Parameter(torch.randn(shape))
            layer.register_parameter("bias", None)
        else:  # Conv1D stores [in, out]
            layer = nn.Linear(shape[0], shape[1], bias=False)
        return self._ort_time(layer.eval(), (torch.randn(x_shape),), {})

    def _ort_time(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        import io
        import warnings

        _onnxruntime()  # before exporting: a missing runtime is the error to report
        buf = io.BytesIO()
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
            v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        names = [f"in{i}" for i in range(len(tensors))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, buf, kwargs=kwargs or None, dynamo=False,  # type: ignore[arg-type]
                                  input_names=names)
        except Exception as exc:  # the exporter raises many types; all mean "cannot time this in ORT"
            raise BudgetError(f"cannot export {type(module).__name__} for ONNX Runtime timing: {exc}") from exc
        session = self._ort_session(buf.getvalue())
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors, strict=False)}
        return _time(lambda: session.run(None, feeds), self.repeats)

    def save(self) -> None:
        """Write the cache atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f)
        os.replace(tmp, self.path)

    def group_costs(self, graph: Any, info: DependencyInfo, groups: list[int]) -> dict[int, float]:
        """Seconds saved per channel removed, for each group id (from its member linear / conv layers).

        ``graph`` is a captured PyTorch graph, or an ONNX graph (needs the ``onnxruntime`` backend).
        """
        if not isinstance(graph, Graph):
            return self._onnx_group_costs(graph, info, groups)
        model = graph.module
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or type(mod).__name__ == "Conv1D":
                def hook(_m: nn.Module, inp: tuple[Any, ...], name: str = name) -> None:
                    if inp and isinstance(inp[0], torch.Tensor):
                        shapes[name] = tuple(inp[0].shape)

                hooks.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                model(*graph.args, **graph.kwargs)
        finally:
            for h in hooks:
                h.remove()
        out: dict[int, float] = {}
        for gid in groups:
            g = info.groups[gid]
            cost = 0.0
            for m in g.members:
                path, _, leaf = m.name.rpartition(".")
                owner = model.get_submodule(path) if path else model
                if leaf != "weight" or path not in shapes:
                    continue
                full = int(model.get_parameter(m.name).shape[m.dim])
                half = max(1, full // 2)
                slope = (self.layer(owner, shapes[path], m.dim, full) - self.layer(owner, shapes[path], m.dim, half))
                cost += max(slope, 0.0) / max(full - half, 1) * m.stride
            out[gid] = cost
        return out

    def model_latency(self, graph: Any) -> float:
        """Median seconds of one forward of the whole model on the example inputs (not cached).

        An ONNX graph runs in ONNX Runtime on random inputs of the analysis shapes.
        """
        if not isinstance(graph, Graph):
            return self._onnx_model(graph)
        model = graph.module
        if self.backend == "onnxruntime":
            return self._ort_time(model, graph.args, graph.kwargs)
        return _time(lambda: model(*graph.args, **graph.kwargs), self.repeats)

    # ------------------------------------------------------------------------------------------ ONNX graphs
    def _ort_session(self, model_bytes: bytes) -> Any:
        ort = _onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

    def _require_ort(self) -> None:
        if self.backend != "onnxruntime":
            raise BudgetError("an ONNX file is timed in ONNX Runtime: use latency_backend='onnxruntime' "
                              f"(got {self.backend!r})")

    def _onnx_model(self, graph: Any) -> float:
        """Median seconds of one run of the whole ONNX model on random inputs of the analysis shapes."""
        import onnx_ir as ir

        self._require_ort()
        session = self._ort_session(ir.to_proto(graph.model).SerializeToString())
        feeds = {i.name: _random(graph.shapes[i.name], graph.dtypes.get(i.name))
                 for i in graph.graph.inputs if not i.is_initializer()}
        return _time(lambda: session.run(None, feeds), self.repeats)

    def onnx_node(self, node: Any, shapes: list[tuple[int, ...] | None], dtypes: list[Any], opset: int) -> float:
        """Seconds for one run of ONNX ``node`` alone in ONNX Runtime, its inputs at ``shapes`` (None: absent)."""
        import onnx
        import onnx_ir as ir
        from onnx import helper

        self._require_ort()
        attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
        key = self._key("onnx", node.domain, node.op_type, tuple(shapes), attrs, opset)
        if key not in self.entries:
            proto = ir.serde.serialize_node(node)
            del proto.input[:]
            del proto.output[:]
            names = [f"in{i}" if shape is not None else "" for i, shape in enumerate(shapes)]
            proto.input.extend(names)
            proto.output.append("out0")
            elem = [helper.np_dtype_to_tensor_dtype(np.dtype(_np_dtype(d))) for d in dtypes]
            inputs = [helper.make_tensor_value_info(n, elem[i], list(shape))
                      for i, (n, shape) in enumerate(zip(names, shapes, strict=True)) if shape is not None]
            out = helper.make_tensor_value_info("out0", elem[0], None)
            model = helper.make_model(helper.make_graph([proto], "layer", inputs, [out]),
                                      opset_imports=[helper.make_opsetid(node.domain, opset)])
            session = self._ort_session(onnx.shape_inference.infer_shapes(model).SerializeToString())
            feeds = {n: _random(shape, dtypes[i]) for i, (n, shape) in enumerate(zip(names, shapes, strict=True))
                     if shape is not None}
            self.entries[key] = _time(lambda: session.run(None, feeds), self.repeats)
            self.measured += 1
        return self.entries[key]

    def _onnx_group_costs(self, graph: Any, info: DependencyInfo, groups: list[int]) -> dict[int, float]:
        self._require_ort()
        readers: dict[str, list[Any]] = {}
        for node, _ in getattr(info, "flop_nodes", []):
            for v in node.inputs:
                if v is not None and v.name and graph.is_weight(v):
                    readers.setdefault(v.name, []).append(node)
        opset = graph.opset()
        out: dict[int, float] = {}
        for gid in groups:
            cost = 0.0
            for m in info.groups[gid].members:
                for node in readers.get(m.placeholder, []):
                    shapes = [graph.shape(v) if v is not None else None for v in node.inputs]
                    full = shapes[node.inputs.index(graph.value(m.placeholder))]
                    if full is None:
                        continue
                    size = full[m.dim]
                    half = max(1, size // 2)
                    narrow = _narrowed(node, shapes, graph.value(m.placeholder), m.dim, half)
                    if narrow is None:
                        continue
                    dtypes = [graph.dtypes.get(v.name) if v is not None else None for v in node.inputs]
                    slope = self.onnx_node(node, shapes, dtypes, opset) - self.onnx_node(node, narrow, dtypes, opset)
                    cost += max(slope, 0.0) / max(size - half, 1) * m.stride
            out[gid] = cost
        return out


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BudgetError("the onnxruntime latency backend needs: pip install 'secateurs[onnx]'") from exc
    return onnxruntime


def _np_dtype(dtype: Any) -> Any:
    """The numpy dtype of an onnx-ir data type (float32 when unknown)."""
    return np.float32 if dtype is None else dtype.numpy()


def _random(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    kind = np.dtype(_np_dtype(dtype))
    if kind.kind in "iu":
        return np.zeros(shape, dtype=kind)
    return np.random.default_rng(0).standard_normal(shape).astype(kind)


def _narrowed(node: Any, shapes: list[tuple[int, ...] | None], weight: Any, dim: int,
              size: int) -> list[tuple[int, ...] | None] | None:
    """``shapes`` with the weight's ``dim`` set to ``size`` and the inputs that share that dim following it.

    MatMul ``x[..., K] @ W[K, N]``, Gemm (``transA`` / ``transB``, bias ``C``) and Conv ``W[Co, Ci/g, ...]``
    (input channels ``Ci``, bias ``Co``); None for any other reading (not timed).
    """
    index = node.inputs.index(weight)
    out = [list(s) if s is not None else None for s in shapes]
    w = out[index]
    assert w is not None
    full = w[dim]
    w[dim] = size
    x = out[0]
    if x is None or index == 0:
        return None
    op = node.op_type
    attr = node.attributes
    if op == "MatMul" and index == 1 and len(w) == 2:
        if dim == 0:
            x[-1] = size
    elif op == "Gemm" and index == 1:
        trans_a = attr["transA"].value if "transA" in attr else 0
        trans_b = attr["transB"].value if "transB" in attr else 0
        if dim == (1 if trans_b else 0):
            x[0 if trans_a else 1] = size
        elif len(out) > 2 and out[2] is not None and out[2][-1] == full:
            out[2][-1] = size
    elif op == "Conv" and index == 1:
        groups = attr["group"].value if "group" in attr else 1
        if dim == 1:
            x[1] = size * groups
        elif dim == 0 and len(out) > 2 and out[2] is not None:
            out[2][0] = size
    else:
        return None
    return [tuple(s) if s is not None else None for s in out]
