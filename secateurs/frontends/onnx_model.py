"""ONNX frontend: load an ``.onnx`` file into an :class:`~secateurs.ir.onnx_graph.OnnxGraph`.

Loading checks the file, converts opsets older than 13 with ``onnx.version_converter``, inlines model-local
functions, turns ``Constant`` nodes into initializers (so every tensor the rewrite may slice is an
initializer), gives each use of a shared initializer its own copy (exporters merge equal tensors, e.g. every
zero bias of a freshly initialised model, which must not couple unrelated channels), and propagates static
shapes: symbolic dimensions get a concrete size, small integer tensors computed from shapes are evaluated,
and every other node's output type comes from ONNX shape inference with those values.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnx import numpy_helper

from secateurs.errors import CaptureError, CheckpointError
from secateurs.ir.onnx_graph import Computed, OnnxGraph, Origin, origin_sources

__all__ = ["MIN_OPSET", "load_onnx", "propagate_shapes"]

log = logging.getLogger(__name__)

MIN_OPSET = 13
_EVAL_LIMIT = 1 << 16
_SYMBOL_SIZES = (7, 11, 13, 17, 19, 23, 29, 31, 37)
_RETRY_SIZES = (67, 227)
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_INPUT_KIND = "pkg.torch.export.graph_signature.InputSpec.kind"
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "Dropout"}
# Ops that only move elements: the element an output holds is found by running the op on element indices.
_MOVES = {"Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Gather", "Slice", "Concat", "Transpose",
          "Expand", "Tile", "GatherElements"}


def load_onnx(
    path: str | os.PathLike[str],
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    symbol_size: int | None = None,
) -> OnnxGraph:
    """Load ``path`` and propagate static shapes.

    Args:
        path: The ``.onnx`` file (external data next to it is loaded too).
        input_shapes: Concrete shapes for graph inputs with symbolic dimensions, by input name. Other symbolic
            dimensions get ``symbol_size``.
        symbol_size: The size of every other symbolic dimension; by default a small prime that no static
            dimension of the model uses (so it cannot be mistaken for a channel count), retried larger if the
            model does not accept it (e.g. a CNN whose spatial size is symbolic).

    Returns:
        The loaded graph with ``shapes``, ``consts`` and ``origins`` filled in.

    Raises:
        CheckpointError: The file is missing or is not a valid ONNX model.
        CaptureError: The opset is older than 13 and cannot be converted.

    """
    file = Path(path)
    proto = _read(file)
    proto = _convert_opset(proto, file)
    if proto.ByteSize() < 2**31 - 1:
        try:  # strict inference refuses weights whose shapes contradict their ops before any rule reads them
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"'{file}' is not a consistent ONNX model: {first}") from exc
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types for malformed protos
        raise CheckpointError(f"'{file}' cannot be read as an ONNX model: {exc}") from exc
    graph = OnnxGraph(model, str(file), {}, {}, {}, {}, {})
    _prepare(graph)
    propagate_shapes(graph, input_shapes=input_shapes, symbol_size=symbol_size)
    return graph


def _read(file: Path) -> onnx.ModelProto:
    if not file.is_file():
        raise CheckpointError(f"ONNX file '{file}' does not exist")
    try:
        onnx.checker.check_model(str(file))
        proto = onnx.load(str(file))
    except Exception as exc:  # protobuf and the checker raise their own types for a malformed file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"'{file}' is not a valid ONNX model: {first}") from exc
    if not proto.graph.node:
        raise CheckpointError(f"'{file}' is not a valid ONNX model: its graph has no nodes")
    return proto


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _convert_opset(proto: onnx.ModelProto, file: Path) -> onnx.ModelProto:
    opset = _default_opset(proto)
    if opset >= MIN_OPSET:
        return proto
    if opset == 0:
        raise CaptureError(f"'{file}' imports no default-domain opset; pruning needs ONNX opset >= {MIN_OPSET}")
    try:
        converted = onnx.version_converter.convert_version(proto, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError / ValidationError / others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"'{file}' uses ONNX opset {opset}; pruning needs opset >= {MIN_OPSET} and onnx.version_converter "
            f"could not convert it: {first}"
        ) from exc
    log.info("converted '%s' from opset %d to %d", file, opset, MIN_OPSET)
    return converted


# ----------------------------------------------------------------------------------------------- preparation
def _prepare(graph: OnnxGraph) -> None:
    """Inline functions, lift constants, untie shared initializers, record readable names and buffers."""
    model = graph.model
    if model.functions:
        ir_passes.InlinePass()(model)
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    names = {v.name for v in model.graph.inputs if v.name} | set(model.graph.initializers)
    names |= {o.name for node in model.graph.all_nodes() for o in node.outputs if o.name}
    for name, value in list(model.graph.initializers.items()):
        meta = value.metadata_props
        folded = meta.get(_FOLDED_FROM)
        if folded:
            try:
                sources = ast.literal_eval(folded)
            except (ValueError, SyntaxError):
                sources = []
            params = [s for s in sources if isinstance(s, str) and s not in names]
            if len(params) == 1:
                graph.display[name] = params[0]
        if meta.get(_INPUT_KIND) == "BUFFER":
            graph.buffers.add(name)
    _untie(graph, names)


def _untie(graph: OnnxGraph, names: set[str]) -> None:
    """Give every use of an initializer used more than once its own value (the tensor is shared, not copied)."""
    g = graph.model.graph
    for name, value in list(g.initializers.items()):
        if value.is_graph_input() or value.is_graph_output() or value.const_value is None:
            continue
        if not value.shape or all(d == 1 for d in value.shape):
            continue  # scalars have no channels to slice
        uses = [u for u in value.uses() if u.node.graph is g]
        if len(uses) < 2 or len(uses) != len(value.uses()):
            continue  # a use inside a subgraph keeps the tensor whole (it is frozen there)
        for k, use in enumerate(uses[1:], start=1):
            new_name = f"{name}__use{k}"
            while new_name in names:
                new_name += "_"
            names.add(new_name)
            copy = ir.Value(name=new_name, shape=ir.Shape(value.shape), type=value.type,
                            const_value=value.const_value)
            g.register_initializer(copy)
            use.node.replace_input_with(use.idx, copy)
            graph.untied[new_name] = name
            if name in graph.display:
                graph.display[new_name] = graph.display[name]
            if name in graph.buffers:
                graph.buffers.add(new_name)


# ------------------------------------------------------------------------------------------ shape propagation
def _symbol_default(model: ir.Model) -> int:
    used: set[int] = set()
    for value in model.graph.initializers.values():
        if value.shape is not None:
            used.update(int(d) for d in value.shape if isinstance(d, int))
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is not None:
            used.update(int(d) for d in value.shape if isinstance(d, int))
    return next((s for s in _SYMBOL_SIZES if s not in used), _SYMBOL_SIZES[-1])


def propagate_shapes(
    graph: OnnxGraph,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    symbol_size: int | None = None,
) -> None:
    """Fill ``graph.shapes``, ``dtypes``, ``consts`` and ``origins`` (see :func:`load_onnx` for the arguments).

    Raises:
        CaptureError: ``input_shapes`` names an unknown input or does not match its rank, or no symbol size
            gives every value a valid shape.

    """
    model = graph.model
    given = dict(input_shapes or {})
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in given.items():
        if name not in inputs:
            raise CaptureError(f"input_shapes names '{name}', which is not an input of the model "
                               f"(inputs: {', '.join(sorted(n for n in inputs if n))})")
        shape = inputs[name].shape
        if shape is not None and len(shape) != len(dims):
            raise CaptureError(f"input '{name}' has rank {len(shape)}, input_shapes gives {list(dims)}")
    sizes = [symbol_size] if symbol_size is not None else [_symbol_default(model), *_RETRY_SIZES]
    problem = ""
    for size in sizes:
        problem = _propagate(graph, given, int(size))
        if not problem:
            return
        log.info("symbol size %d does not fit the model (%s); trying a larger one", size, problem)
    raise CaptureError(f"no static shapes for '{graph.path}': {problem}; pass input_shapes "
                       "(on the command line: --input-shape NAME=1,3,224,224, once per input)")


def _propagate(graph: OnnxGraph, given: dict[str, Sequence[int]], size: int) -> str:
    """One propagation with symbolic dims of size ``size``; returns a problem description or ''."""
    model = graph.model
    graph.shapes, graph.dtypes, graph.consts, graph.origins, graph.symbols = {}, {}, {}, {}, {}
    graph.invalidate()
    for value in model.graph.inputs:
        vname = value.name
        if value.is_initializer() or not vname:
            continue
        if value.shape is None:
            if vname not in given:
                return f"input '{vname}' has no shape"
            dims = [int(d) for d in given[vname]]
        else:
            dims = []
            for i, d in enumerate(value.shape):
                if isinstance(d, int):
                    dims.append(d)
                    continue
                key = d.value if isinstance(d.value, str) and d.value else f"{vname}:{i}"
                chosen = int(given[vname][i]) if vname in given else graph.symbols.get(key, size)
                graph.symbols[key] = chosen
                dims.append(chosen)
        graph.shapes[vname] = tuple(dims)
        if value.dtype is not None:
            graph.dtypes[vname] = value.dtype
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        graph.shapes[name] = tuple(int(d) for d in tensor.shape.numpy())
        graph.dtypes[name] = tensor.dtype
        if not tensor.dtype.is_floating_point() and tensor.size <= _EVAL_LIMIT and tensor.dtype != ir.DataType.STRING:
            graph.consts[name] = tensor.numpy()
            graph.origins[name] = (None,) * int(tensor.size)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    for node in model.graph:
        try:
            _visit(graph, node, opsets)
        except _ShapeError as exc:
            return str(exc)
    return ""


class _ShapeError(Exception):
    """A node has an impossible shape with the chosen symbol sizes (internal signal)."""


def _node_where(node: ir.Node) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def _visit(graph: OnnxGraph, node: ir.Node, opsets: list[onnx.OperatorSetIdProto]) -> None:
    ins = list(node.inputs)
    if node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size") and graph.shape(ins[0]) is not None:
        _eval_shape(graph, node)
        return
    known = [graph.const(v) if v is not None else None for v in ins]
    evaluable = (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _RANDOM_OPS
        and not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        and all(v is None or k is not None for v, k in zip(ins, known, strict=True))
    )
    if evaluable and _small_enough(node, known):
        outs = _run_node(node, list(known))
        if outs is not None:
            for value, arr in zip(node.outputs, outs, strict=False):
                if not value.name:
                    continue
                graph.shapes[value.name] = tuple(int(d) for d in arr.shape)
                graph.dtypes[value.name] = ir.DataType.from_numpy(arr.dtype)
                if arr.size <= _EVAL_LIMIT:
                    graph.consts[value.name] = arr
                    graph.origins[value.name] = _origins(graph, node, ins, arr)
            return
    _infer(graph, node, ins, opsets)


def _small_enough(node: ir.Node, known: list[np.ndarray | None]) -> bool:
    """Whether evaluating ``node`` stays small (ops that build a tensor from a shape can be huge)."""
    if node.op_type in ("ConstantOfShape", "Expand") and known and known[-1] is not None:
        target = known[-1] if node.op_type == "ConstantOfShape" else known[1]
        if target is None or np.any(target < 0):
            return False
        return int(np.prod(np.maximum(target, 1), dtype=np.float64)) <= _EVAL_LIMIT
    if node.op_type == "Tile" and len(known) > 1 and known[0] is not None and known[1] is not None:
        return int(known[0].size * np.prod(np.maximum(known[1], 1), dtype=np.float64)) <= _EVAL_LIMIT
    return True


def _eval_shape(graph: OnnxGraph, node: ir.Node) -> None:
    x = node.inputs[0]
    assert x is not None
    shape = graph.shape(x)
    assert shape is not None
    out = node.outputs[0]
    if node.op_type == "Size":
        graph.shapes[out.name or ""] = ()
        graph.consts[out.name or ""] = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        graph.origins[out.name or ""] = (Computed(frozenset((x.name or "", d) for d in range(len(shape)))),)
        graph.dtypes[out.name or ""] = ir.DataType.INT64
        return
    rank = len(shape)
    start_attr, end_attr = node.attributes.get("start"), node.attributes.get("end")
    start = int(start_attr.value) if start_attr is not None else 0
    end = int(end_attr.value) if end_attr is not None else rank
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    dims = list(range(start, end))
    name = out.name or ""
    graph.consts[name] = np.array([shape[d] for d in dims], dtype=np.int64)
    graph.shapes[name] = (len(dims),)
    graph.dtypes[name] = ir.DataType.INT64
    graph.origins[name] = tuple((x.name or "", d) for d in dims)


def _run_node(node: ir.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """Run one node with ONNX's reference implementation (None when it cannot)."""
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = list(proto.input)
    feeds = {n: a for n, a in zip(names, inputs, strict=True) if n and a is not None}
    try:
        evaluator = ReferenceEvaluator(proto)
        outs = evaluator.run(None, feeds)
    except Exception:  # any failure just means "not evaluated here"; inference runs instead
        return None
    return [np.asarray(o) for o in outs]


def _origins(graph: OnnxGraph, node: ir.Node, ins: list[ir.Value | None], out: np.ndarray) -> tuple[Origin, ...]:
    """Where each element of an evaluated output comes from."""
    sources = [graph.origins.get(v.name or "") if v is not None else None for v in ins]
    flat_in = [s for s in sources if s is not None]
    if all(o is None for s in flat_in for o in s):
        return (None,) * int(out.size)
    if node.op_type in ("Cast", "CastLike") and sources and sources[0] is not None and len(sources[0]) == out.size:
        return sources[0]
    if node.op_type in _MOVES:
        traced = _trace_moves(graph, node, ins, sources)
        if traced is not None and len(traced) == out.size:
            return traced
    computed = Computed(frozenset().union(*(origin_sources(o) for s in flat_in for o in s)))
    return (computed,) * int(out.size)


def _trace_moves(
    graph: OnnxGraph, node: ir.Node, ins: list[ir.Value | None], sources: list[tuple[Origin, ...] | None]
) -> tuple[Origin, ...] | None:
    """Run a data-movement op on element indices to find which input element each output element holds."""
    data_slots = range(len(ins)) if node.op_type == "Concat" else range(1)
    table: list[Origin] = []
    feeds: list[np.ndarray | None] = []
    for i, v in enumerate(ins):
        arr = graph.const(v)
        if i in data_slots and arr is not None:
            src = sources[i]
            if src is None:
                return None
            feeds.append(np.arange(len(table), len(table) + arr.size, dtype=np.int64).reshape(arr.shape))
            table.extend(src)
        else:
            feeds.append(arr)
    outs = _run_node(node, feeds)
    if outs is None:
        return None
    return tuple(table[int(i)] for i in outs[0].reshape(-1))


def _type_proto(graph: OnnxGraph, value: ir.Value) -> onnx.TypeProto | None:
    shape = graph.shapes.get(value.name or "")
    dtype = graph.dtypes.get(value.name or "") or value.dtype
    if dtype is None:
        return None
    return onnx.helper.make_tensor_type_proto(int(dtype), list(shape) if shape is not None else None)


def _infer(graph: OnnxGraph, node: ir.Node, ins: list[ir.Value | None],
           opsets: list[onnx.OperatorSetIdProto]) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = graph.opset(node.domain) or graph.opset(domain)
    try:
        schema = onnx.defs.get_schema(node.op_type, version, domain)
    except Exception:  # no schema: an op of a custom domain; only shapes stored in the file are known
        _stored_shapes(graph, node)
        _contrib_shapes(graph, node, ins)
        return
    types: dict[str, onnx.TypeProto] = {}
    data: dict[str, onnx.TensorProto] = {}
    for v in ins:
        if v is None or not v.name:
            continue
        tp = _type_proto(graph, v)
        if tp is None:
            continue
        types[v.name] = tp
        arr = graph.consts.get(v.name)
        if arr is not None:
            data[v.name] = numpy_helper.from_array(arr, v.name)
    try:
        out_types = onnx.shape_inference.infer_node_outputs(
            schema, ir.serde.serialize_node(node), types, data, opset_imports=opsets
        )
    except Exception as exc:  # inference errors mean this op's output is unknown
        if any(graph.shapes.get(v.name or "") is None for v in ins if v is not None):
            return
        raise _ShapeError(f"shape inference fails at {_node_where(node)}: {str(exc).splitlines()[0]}") from exc
    for value in node.outputs:
        tp = out_types.get(value.name or "")
        if tp is None or not tp.HasField("tensor_type"):
            continue
        tt = tp.tensor_type
        if tt.elem_type:
            graph.dtypes[value.name or ""] = ir.DataType(tt.elem_type)
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims):
            continue
        if any(d is not None and d <= 0 for d in dims) and not _empty_ok(node):
            raise _ShapeError(f"{_node_where(node)} gets an empty dimension {dims}")
        graph.shapes[value.name or ""] = tuple(int(d) for d in dims if d is not None)


# ONNX Runtime contrib ops (no schema in the onnx package) whose first output has the shape of the first input;
# the others are per-row statistics (last dim 1), except SkipLayerNorm's input + skip sum (output 3).
_CONTRIB_SAME_SHAPE = {"SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                       "FastGelu", "BiasGelu", "QuickGelu", "Gelu", "BiasAdd"}


def _contrib_shapes(graph: OnnxGraph, node: ir.Node, ins: list[ir.Value | None]) -> None:
    if node.domain != "com.microsoft" or node.op_type not in _CONTRIB_SAME_SHAPE or not ins:
        return
    shape = graph.shape(ins[0])
    if shape is None:
        return
    for i, value in enumerate(node.outputs):
        if not value.name or value.name in graph.shapes:
            continue
        same = i == 0 or (i == 3 and node.op_type.startswith("Skip"))
        graph.shapes[value.name] = shape if same else (*shape[:-1], 1)
        dtype = graph.dtypes.get(ins[0].name or "") if ins[0] is not None else None
        if dtype is not None:
            graph.dtypes[value.name] = dtype


def _stored_shapes(graph: OnnxGraph, node: ir.Node) -> None:
    """Take output shapes from the file (value_info) where every dim is static or a known symbol."""
    for value in node.outputs:
        if value.shape is None or not value.name:
            continue
        dims = []
        for d in value.shape:
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d.value, str) and d.value in graph.symbols:
                dims.append(graph.symbols[d.value])
            else:
                break
        else:
            graph.shapes[value.name] = tuple(dims)
            if value.dtype is not None:
                graph.dtypes[value.name] = value.dtype


def _empty_ok(node: ir.Node) -> bool:
    """Ops that legitimately produce empty tensors (slices past the end are caught by the caller)."""
    return node.op_type in ("Slice", "Split", "NonZero", "Compress", "TopK")

