"""TensorRT-friendliness checks of an ONNX file that need no GPU: 2:4 layout, channel alignment, folding.

TensorRT accelerates 2:4 sparse weights only along one axis per op, and only weights it sees as constants:

* ``Conv``: the input-channel axis of ``W [out, in/groups, *kernel]`` (axis 1): every output channel and kernel
  position has groups of 4 consecutive input channels.
* ``Gemm``: the K axis of ``B``: axis 0, or axis 1 with ``transB=1`` (PyTorch's ``nn.Linear`` weight as is).
* ``MatMul`` with a constant ``B``: the K axis of ``B``, its rows (axis -2). PyTorch's exporters write
  ``nn.Linear`` weights here transposed (``B = W^T``); the check reads the layout actually in the file.

:func:`sparsity_layout` reports every such weight, like ``polygraphy inspect sparsity``. Weights that the file
computes at run time (e.g. ``Mul(weight_orig, weight_mask)`` left by the dynamo exporter when pruning masks are
still attached, above the exporter's constant-folding size limit) are reported as ``computed``:
:func:`fold_constants` turns them into initializers (and drops the stored masks). :func:`channel_alignment`
lists layers whose channel counts are not multiples of 8, which TensorRT's tensor-core kernels pad.

Only the top-level graph is read (not subgraphs or functions), and INT8 weights behind ``DequantizeLinear``
are not followed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from secateurs.backends.files import atomic_dir, publish
from secateurs.errors import BackendUnavailableError, CheckpointError

__all__ = [
    "ChannelAlignment",
    "FoldResult",
    "WeightLayout",
    "channel_alignment",
    "check_sparsity",
    "fold_constants",
    "sparsity_layout",
]

log = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# ops TensorRT's ONNX parser applies to weights while importing them (the result is still a weight)
_TRANSPARENT = ("Identity", "Transpose")
# ops on constants that the file evaluates at run time (TensorRT sees a computed tensor)
_COMPUTED = ("Cast", "Mul")
# ops that keep the channel count between a layer and a graph input / output (for ``fixed_io``)
_CHANNEL_PRESERVING = frozenset({
    "Add", "BatchNormalization", "Cast", "Clip", "Div", "Dropout", "Erf", "Flatten", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LayerNormalization", "LeakyRelu", "LogSoftmax", "Mul", "Relu", "Reshape", "Sigmoid",
    "Softmax", "Squeeze", "Sub", "Tanh", "Unsqueeze",
})
_SPARSE_DTYPES = (1, 10, 16)  # FLOAT, FLOAT16, BFLOAT16


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """The 2:4 status of one Conv / Gemm / MatMul weight as TensorRT would see it.

    ``status`` is ``"sparse"`` (every group of ``m`` along ``axis`` has at least ``n`` zeros), ``"dense"``
    (``bad_groups`` of ``groups`` do not), ``"indivisible"`` (the axis is not a multiple of ``m``), ``"dtype"``
    (not FP32 / FP16 / BF16) or ``"computed"`` (the weight is computed from constants at run time, so TensorRT
    does not see a constant; ``bad_groups`` then describes the computed value: run :func:`fold_constants`).
    """

    node: str
    op: str
    weight: str
    module: str
    shape: tuple[int, ...]
    axis: int
    groups: int
    bad_groups: int
    status: str
    source: str

    @property
    def sparse(self) -> bool:
        """Whether TensorRT can use a 2:4 kernel for this weight (constant, right axis, right pattern)."""
        return self.status == "sparse"

    def describe(self) -> str:
        """One line naming the weight, its node and module, and what is wrong (or ``sparse``)."""
        where = f"weight '{self.weight}' of {self.op} '{self.node}'" + (
            f" (module '{self.module}')" if self.module else "")
        if self.status == "sparse":
            return f"{where}: 2:4 sparse along axis {self.axis}"
        if self.status == "dense":
            return (f"{where}: {self.bad_groups} of {self.groups} groups along axis {self.axis} "
                    f"(shape {list(self.shape)}) break the pattern")
        if self.status == "indivisible":
            return f"{where}: axis {self.axis} has {self.shape[self.axis]} channels, not a multiple of the group"
        if self.status == "dtype":
            return f"{where}: its type is not FP32 / FP16 / BF16, which TensorRT's sparse kernels need"
        pattern = "follows" if self.bad_groups == 0 else f"breaks ({self.bad_groups} of {self.groups} groups)"
        return (f"{where}: computed at run time by {self.source}, not a constant TensorRT can sparsify (its "
                f"value {pattern} the pattern); run fold_constants() or remove_masks() before export")


@dataclasses.dataclass(frozen=True)
class ChannelAlignment:
    """A Conv / Gemm / MatMul weight whose input or output channel count is not a multiple of ``multiple``."""

    node: str
    op: str
    weight: str
    module: str
    in_channels: int
    out_channels: int
    misaligned: tuple[str, ...]

    def describe(self) -> str:
        """One line naming the weight and its channel counts."""
        mod = f" (module '{self.module}')" if self.module else ""
        return (f"{self.op} '{self.node}'{mod}, weight '{self.weight}': {self.in_channels} in / "
                f"{self.out_channels} out channels; misaligned: {', '.join(self.misaligned)}")


@dataclasses.dataclass(frozen=True)
class FoldResult:
    """What :func:`fold_constants` wrote: the file and its node / initializer-byte counts before and after."""

    path: Path
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass
class _Const:
    value: np.ndarray
    elem_type: int
    source: str  # how the value is made: an initializer name, "Constant", or ops over those
    computed: bool
    origin: str | None  # the initializer it is (through Identity / Transpose), if any


class _Graph:
    """Lookup tables over an ONNX graph: initializers, producers, consumers, and constant resolution."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnx

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"ONNX file '{p}' does not exist")
        try:
            self.model = onnx.load(str(p))
        except Exception as exc:  # protobuf / external-data errors come in many types
            raise CheckpointError(f"cannot read ONNX file '{p}': {exc}") from exc
        g = self.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inputs = {i.name for i in g.input} - set(self.inits)
        self.outputs = {o.name for o in g.output}
        self._cache: dict[str, _Const | None] = {}

    def const(self, name: str) -> _Const | None:
        """The value of ``name`` if it is a constant (initializer, Constant, or ops over constants), else None."""
        if name not in self._cache:
            self._cache[name] = self._resolve(name)
        return self._cache[name]

    def _resolve(self, name: str) -> _Const | None:
        from onnx import helper, numpy_helper

        if name in self.inits:
            t = self.inits[name]
            return _Const(numpy_helper.to_array(t), t.data_type, name, False, name)
        node = self.producer.get(name)
        if node is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            if "value" not in attrs:
                return None
            return _Const(numpy_helper.to_array(attrs["value"]), attrs["value"].data_type, "Constant", False, None)
        if node.op_type not in _TRANSPARENT + _COMPUTED:
            return None
        args = [self.const(i) for i in node.input]
        if not args or any(a is None for a in args):
            return None
        first = args[0]
        assert first is not None
        if node.op_type == "Identity":
            return first
        if node.op_type == "Transpose":
            perm = attrs.get("perm")
            value = np.transpose(first.value, perm) if perm is not None else first.value.T
            return _Const(value, first.elem_type, f"Transpose({first.source})", first.computed, first.origin)
        if node.op_type == "Cast":
            to = int(attrs["to"])
            return _Const(first.value.astype(helper.tensor_dtype_to_np_dtype(to)), to, f"Cast({first.source})", True,
                          None)
        values = [a.value for a in args if a is not None]
        return _Const(np.multiply(*values), first.elem_type,
                      f"Mul({', '.join(a.source for a in args if a is not None)})", True, None)

    @staticmethod
    def module_of(node: Any, weight: _Const | None = None) -> str:
        """The PyTorch module a weight node came from, best effort.

        From the weight's initializer name when it is a parameter name (``<module>.weight``), else the dynamo
        exporter's name scopes (a Conv fused with its BatchNorm carries the BatchNorm's), else a legacy node name.
        """
        if weight is not None and weight.origin is not None and weight.origin.endswith(".weight"):
            return weight.origin[: -len(".weight")]
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
                return scopes[-2] if len(scopes) >= 2 else ""
        if node.name.startswith("/"):
            return ".".join(node.name.strip("/").split("/")[:-1])
        return ""

    def weights(self) -> Iterable[tuple[Any, str, _Const]]:
        """(node, weight input name, constant) of every Conv / Gemm / MatMul whose weight input is constant."""
        for node in self.model.graph.node:
            if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
                continue
            c = self.const(node.input[1])
            if c is not None and c.value.ndim >= 1:
                yield node, node.input[1], c

    def reaches(self, name: str, *, forward: bool) -> bool:
        """Whether ``name`` reaches a graph output (``forward``) / comes from a graph input via channel-keeping ops."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if (t in self.outputs) if forward else (t in self.inputs):
                return True
            if forward:
                for n in self.consumers.get(t, []):
                    if n.op_type in _CHANNEL_PRESERVING:
                        stack.extend(n.output)
            else:
                n = self.producer.get(t)
                if n is not None and n.op_type in _CHANNEL_PRESERVING:
                    stack.extend(i for i in n.input if i and self.const(i) is None)
        return False


def _k_axis(node: Any, value: np.ndarray) -> int:
    """The axis of the weight (as TensorRT receives it) along which 2:4 groups run."""
    from onnx import helper

    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return value.ndim - 2 if value.ndim >= 2 else 0


def sparsity_layout(onnx_path: str | os.PathLike[str], n: int = 2, m: int = 4) -> list[WeightLayout]:
    """Report, for every Conv / Gemm / MatMul weight of ``onnx_path``, whether TensorRT sees it as N:M sparse.

    Groups of ``m`` run along the axis TensorRT expects (see the module docstring); a group passes with at least
    ``n`` zeros. Weights reached through ``Identity`` / ``Transpose`` are followed (TensorRT's parser applies
    them to weights); weights computed by ``Mul`` / ``Cast`` are reported as ``computed``.

    Args:
        onnx_path: The ``.onnx`` file (external data is read from beside it).
        n: Zeros needed per group.
        m: Group size.

    Returns:
        One :class:`WeightLayout` per weight, in graph order. MatMuls of two activations are not listed.

    Raises:
        CheckpointError: The file is missing or unreadable.

    """
    graph = _Graph(onnx_path)
    layouts = []
    for node, name, c in graph.weights():
        value = c.value
        axis = _k_axis(node, value)
        groups = bad = 0
        if value.shape[axis] % m:
            status = "indivisible"
        else:
            rows = np.moveaxis(value, axis, -1).reshape(-1, m)
            zeros = (rows == 0).sum(-1)
            groups, bad = int(rows.shape[0]), int((zeros < n).sum())
            if c.elem_type not in _SPARSE_DTYPES:
                status = "dtype"
            elif c.computed:
                status = "computed"
            else:
                status = "dense" if bad else "sparse"
        weight = c.origin or name
        layouts.append(WeightLayout(node.name, node.op_type, weight, graph.module_of(node, c), tuple(value.shape),
                                    axis, groups, bad, status, c.source))
    return layouts


def check_sparsity(onnx_path: str | os.PathLike[str], n: int = 2, m: int = 4, *,
                   modules: Iterable[str] | None = None) -> list[str]:
    """One message per weight that TensorRT would not run as N:M sparse (empty when all are).

    Args:
        onnx_path: The ``.onnx`` file.
        n: Zeros needed per group.
        m: Group size.
        modules: Only check the weights of these PyTorch modules (e.g. the layers a sparsity pass targeted;
            the classifier it left dense is then not reported). Every named module must be found in the file.

    Raises:
        CheckpointError: The file is unreadable, or a module in ``modules`` has no weight in it.

    """
    layouts = sparsity_layout(onnx_path, n, m)
    if modules is not None:
        wanted = set(modules)
        missing = wanted - {lay.module for lay in layouts}
        if missing:
            raise CheckpointError(f"no Conv / Gemm / MatMul weight of module(s) {sorted(missing)} in '{onnx_path}'")
        layouts = [lay for lay in layouts if lay.module in wanted]
    return [lay.describe() for lay in layouts if not lay.sparse]


def channel_alignment(onnx_path: str | os.PathLike[str], multiple: int = 8, *,
                      fixed_io: bool = True) -> list[ChannelAlignment]:
    """Conv / Gemm / MatMul weights whose input or output channel count is not a multiple of ``multiple``.

    Args:
        onnx_path: The ``.onnx`` file.
        multiple: The alignment tensor-core kernels want (8 for FP16, 16 for INT8).
        fixed_io: Do not report channel counts set by the model's interface: the input channels of a layer fed
            by a graph input (e.g. 3 RGB channels) and the output channels of a layer that reaches a graph output
            (e.g. the class count), through channel-preserving ops. Pruning cannot align those.

    Returns:
        One :class:`ChannelAlignment` per misaligned weight (empty when all are aligned).

    Raises:
        CheckpointError: The file is missing or unreadable.

    """
    from onnx import helper

    graph = _Graph(onnx_path)
    found = []
    for node, name, c in graph.weights():
        shape = c.value.shape
        if node.op_type == "Conv":
            group = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "group"), 1)
            cin, cout = shape[1] * group, shape[0]
        else:
            axis = _k_axis(node, c.value)
            cin = shape[axis]
            cout = shape[-1] if node.op_type == "MatMul" else shape[1 - axis] if len(shape) == 2 else shape[0]
        bad = []
        if cin % multiple and not (fixed_io and graph.reaches(node.input[0], forward=False)):
            bad.append("in")
        if cout % multiple and not (fixed_io and graph.reaches(node.output[0], forward=True)):
            bad.append("out")
        if bad:
            weight = c.origin or name
            found.append(ChannelAlignment(node.name, node.op_type, weight, graph.module_of(node, c), int(cin), int(cout),
                                          tuple(bad)))
    return found


def fold_constants(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None, *,
                   size_limit: int = 1 << 34, external_data_bytes: int = 1 << 30) -> FoldResult:
    """Fold constant subgraphs of ``onnx_path`` with onnxscript's optimizer, with no size limit on the folds.

    The dynamo exporter folds only small constants, so large weights computed from constants stay computed at
    run time (``Mul(weight_orig, weight_mask)`` from attached pruning masks, ``Transpose`` / ``Cast`` of
    weights); TensorRT then sees no constant weight to sparsify and the file stores masks it does not need.
    Folding makes them initializers. The result is written atomically (a temporary file, renamed).

    Args:
        onnx_path: The ``.onnx`` file to fold.
        out_path: Where to write (default: replace ``onnx_path``).
        size_limit: Largest input / output tensor (in elements) a fold may touch.
        external_data_bytes: Above this many initializer bytes the weights go to ``<out name>.data`` beside the
            model (ONNX protobufs stop at 2 GB).

    Returns:
        The :class:`FoldResult`.

    Raises:
        BackendUnavailableError: onnxscript / onnx-ir are not installed.
        CheckpointError: The file is missing or the optimizer failed (nothing is written).

    """
    try:
        import onnx_ir as ir
        import onnxscript.optimizer as optimizer
    except ImportError as exc:
        raise BackendUnavailableError("onnxscript is not installed: pip install secateurs[onnx]") from exc
    src = Path(onnx_path)
    out = Path(out_path) if out_path is not None else src
    if not src.is_file():
        raise CheckpointError(f"ONNX file '{src}' does not exist")
    try:
        model = ir.load(str(src))
        before = (_count_nodes(model), _init_bytes(model))
        optimizer.optimize(model, input_size_limit=size_limit, output_size_limit=size_limit)
        after = (_count_nodes(model), _init_bytes(model))
    except Exception as exc:  # the optimizer and loader raise many types
        raise CheckpointError(f"constant folding of '{src}' failed: {exc}") from exc
    with atomic_dir(out) as tmp_dir:
        data_name = f"{out.name}.data" if after[1] > external_data_bytes else None
        try:
            ir.save(model, str(tmp_dir / out.name), external_data=data_name)
        except Exception as exc:  # disk and serialization errors
            raise CheckpointError(f"cannot write folded model to '{out}': {exc}") from exc
        publish(tmp_dir)
        if data_name is not None:
            os.replace(tmp_dir / data_name, out.parent / data_name)
        os.replace(tmp_dir / out.name, out)
    log.info("folded '%s': %d -> %d nodes, %d -> %d initializer bytes", src, before[0], after[0], before[1],
             after[1])
    return FoldResult(out, before[0], after[0], before[1], after[1])


def _count_nodes(model: Any) -> int:
    return sum(1 for _ in model.graph)


def _init_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
