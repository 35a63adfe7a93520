"""Capture a module by recording one eager forward at the ATen level: the fast capture.

``torch.export`` traces with fake tensors through about a millisecond of Python per op, and that was 90% of a
pruning call. This frontend runs the module once on the example inputs (real tensors, or meta tensors for a
model too large for memory) under a ``TorchDispatchMode`` below autograd. There the composite ops torch.export
keeps in its training IR (``aten.linear``, ``aten.conv2d``, ``aten.layer_norm``,
``aten.scaled_dot_product_attention``...) reach the mode before they decompose, so the recorded graph has the
same ops, arguments and layout as an exported program: placeholders for parameters, buffers, lifted constants
and user inputs (named as torch.export names them), one node per op with ``meta['val']`` (a meta tensor) and
``nn_module_stack``, ``operator.getitem`` for the parts of multi-output ops. The model's code runs with
torch.compiler's exporting flags set, so it takes the code paths it takes under torch.export (Hugging Face's
materialised masks, ``nn.MultiheadAttention`` without its fused fast path).

What it cannot record faithfully it refuses with :class:`RecordError` before anything changes, and
:func:`secateurs.frontends.torch_export.capture_call` falls back to torch.export: an op that writes into a
parameter, buffer or input; Python reading a tensor's values (``if x.sum() > 0``, ``.item()``, ``torch.equal``),
where the graph could depend on the inputs, which torch.export refuses too; an output that is no tensor; a
tensor it cannot describe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
import re
import weakref
from collections.abc import Container, Iterator
from typing import Any, NoReturn

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from secateurs.ir.graph import RecordedProgram

__all__ = ["Diverged", "RecordError", "Recorded", "LAYOUT_ONLY", "Replayed", "record_call", "replay_call"]


class RecordError(Exception):
    """The forward cannot be recorded faithfully; the caller falls back to ``torch.export``."""


@dataclasses.dataclass
class Recorded:
    """What one recording produced.

    The program, the placeholder names of each kind (as an export names them) and the forward's output tensors.
    """

    program: RecordedProgram
    params: dict[str, str]
    buffers: dict[str, str]
    constants: dict[str, str]
    user_inputs: list[str]
    user_outputs: list[str]
    outputs: list[torch.Tensor]
    values: dict[str, Any] | None = None


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """torch.compiler's compiling / exporting flags set, as torch.export sets them while it traces."""
    compiler = torch.compiler
    if not hasattr(compiler, "_is_compiling_flag") or not hasattr(compiler, "_is_exporting_flag"):
        yield
        return
    old = compiler._is_compiling_flag, compiler._is_exporting_flag
    compiler._is_compiling_flag = compiler._is_exporting_flag = True
    try:
        yield
    finally:
        compiler._is_compiling_flag, compiler._is_exporting_flag = old


def _ident(name: str) -> str:
    """``name`` made a Python identifier the way torch.export names placeholders (``block1-0.w`` -> ``block1_0_w``)."""
    name = re.sub(r"[^0-9a-zA-Z_]", "_", name).lower()
    return f"_{name}" if name[:1].isdigit() else name


def _meta(value: Any) -> Any:
    """A meta tensor with ``value``'s shape, strides and dtype (what ``meta['val']`` holds); other values as is."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value
        try:
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        except (RuntimeError, NotImplementedError) as exc:  # sparse, quantized, nested layouts
            raise RecordError(f"cannot describe a {value.layout} tensor of dtype {value.dtype}: {exc}") from exc
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The (non-meta) tensors ``func`` writes into, by its schema."""
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = kwargs.get(a.name, args[i] if i < len(args) and not a.kwarg_only else None)
        for t in pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                yield t


class _Tape:
    """The graph under construction and the tensor -> node binding of one recording."""

    def __init__(self, model: nn.Module, keep_values: bool = False) -> None:
        self.graph = fx.Graph()
        self.values: dict[str, Any] | None = {} if keep_values else None
        # id -> (weak reference, node): an entry leaves when its tensor dies, so a reused id never aliases it and
        # the forward keeps no more alive than an ordinary one
        self.bound: dict[int, tuple[weakref.ref[torch.Tensor], fx.Node]] = {}
        self.protected: dict[int, str] = {}  # storage -> what it holds (parameters, buffers, inputs)
        self.constants: dict[str, str] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.attr_names: dict[int, str] = {}  # plain tensor attributes of modules (export's CONSTANT_TENSOR)
        self.paths: dict[int, str] = {}  # module -> its qualified name, for nn_module_stack
        for path, mod in model.named_modules():
            self.paths[id(mod)] = path
            for key, value in vars(mod).items():
                if isinstance(value, torch.Tensor) and not key.startswith("_"):
                    self.attr_names.setdefault(id(value), f"{path}.{key}" if path else key)
        self.anchor: fx.Node | None = None  # constants go before the first user input
        self.refused = ""
        self.stack: dict[str, tuple[str, str]] = {}

    def placeholder(self, name: str, value: Any) -> fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = _meta(value)
        if self.values is not None:
            self.values[node.name] = value
        if isinstance(value, torch.Tensor):
            self.bind(value, node)
        return node

    def bind(self, tensor: torch.Tensor, node: fx.Node) -> None:
        key = id(tensor)
        bound = self.bound

        def gone(ref: weakref.ref[torch.Tensor]) -> None:
            hit = bound.get(key)
            if hit is not None and hit[0] is ref:
                del bound[key]

        bound[key] = (weakref.ref(tensor, gone), node)

    def node_for(self, tensor: torch.Tensor) -> fx.Node:
        hit = self.bound.get(id(tensor))
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        # a tensor no recorded op made: a module attribute or one built outside the dispatcher (``torch.tensor``)
        target = self.attr_names.get(id(tensor))
        if target is None:
            inner = list(self.stack.values())[-1][0] if self.stack else ""
            target = f"{inner}.lifted_tensor_{len(self.constants)}" if inner else f"lifted_tensor_{len(self.constants)}"
        ctx = self.graph.inserting_before(self.anchor) if self.anchor is not None else contextlib.nullcontext()
        with ctx:
            node = self.graph.placeholder(_ident("c_" + target))
        node.meta["val"] = _meta(tensor)
        if self.values is not None:
            self.values[node.name] = tensor
        self.constants[node.name] = target
        self.state[node.name] = tensor
        self.bind(tensor, node)
        return node

    def arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node_for(value)
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self.arg(v) for v in value) if type(value) in (list, tuple) else [
                self.arg(v) for v in value]
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        return value

    def check_writes(self, func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse an op that would write into a parameter, buffer or input (before it runs)."""
        for t in _written(func, args, kwargs):
            what = self.protected.get(t.untyped_storage().data_ptr())
            if what is not None:
                self.refuse(f"{func} writes into {what} during forward")

    def meta(self, value: Any) -> Any:
        """:func:`_meta` of an op's output; what it cannot describe stops the recording."""
        try:
            return _meta(value)
        except RecordError as exc:
            self.refuse(str(exc))

    def refuse(self, why: str) -> NoReturn:
        """Stop the recording (kept even if the model's code catches the exception)."""
        self.refused = self.refused or why
        raise RecordError(why)

    def call(self, func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if func is torch.ops.aten.detach.default and isinstance(args[0], torch.Tensor):
            self.bind(out, self.node_for(args[0]))  # the same values; torch.export leaves no node for it either
            return
        if func is torch.ops.aten.lift_fresh.default:  # ``torch.tensor(...)``: torch.export writes it as a copy
            func = torch.ops.aten.lift_fresh_copy.default
        node = self.graph.create_node("call_function", func, self.arg(args), self.arg(kwargs),
                                      name=func.overloadpacket.__name__)
        node.meta["nn_module_stack"] = self.stack
        node.meta["val"] = self.meta(out)
        if self.values is not None:  # copies: a later in-place op must not change what this node computed
            self.values[node.name] = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out)
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, (list, tuple)):
            for i, part in enumerate(out):
                if isinstance(part, torch.Tensor):
                    item = self.graph.create_node("call_function", operator.getitem, (node, i), name="getitem")
                    item.meta["nn_module_stack"] = self.stack
                    item.meta["val"] = self.meta(part)
                    if self.values is not None:
                        self.values[item.name] = self.values[node.name][i]
                    self.bind(part, item)

    def enter(self, module: nn.Module) -> None:
        path = self.paths.get(id(module))
        if path is not None:
            stack = dict(self.stack)
            stack["L__self__" + path.replace(".", "_")] = (path, f"{type(module).__module__}.{type(module).__qualname__}")
            self.stack = stack

    def leave(self, module: nn.Module) -> None:
        path = self.paths.get(id(module))
        key = "L__self__" + path.replace(".", "_") if path is not None else None
        if key is not None and key in self.stack:
            self.stack = {k: v for k, v in self.stack.items() if k != key}


_DATA_DEPENDENT = {torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default,
                   torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}
"""Ops that hand a tensor's values to Python: what follows may depend on the inputs."""


class _Mode(TorchDispatchMode):
    """Records every ATen op that reaches the Python key (below autograd: composite ops not yet decomposed)."""

    def __init__(self, tape: _Tape) -> None:
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT:
            self.tape.refuse(f"the forward reads tensor values into Python ({func}): its graph may depend on the "
                             "inputs (data-dependent control flow or sizes)")
        if func._schema.is_mutable:
            self.tape.check_writes(func, args, kwargs)
        out = func(*args, **kwargs)
        self.tape.call(func, args, kwargs, out)
        return out


def _input_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, leaf) for every leaf of the inputs, named after ``forward``'s parameters as torch.export names them."""
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    out: list[tuple[str, Any]] = []
    for i, value in enumerate(args):
        base = names[i] if i < len(names) else f"args_{i}"
        leaves = pytree.tree_leaves(value)
        out.extend((base if len(leaves) == 1 and not isinstance(value, (list, tuple, dict)) else f"{base}_{j}", v)
                   for j, v in enumerate(leaves))
    for key, value in kwargs.items():
        leaves = pytree.tree_leaves(value)
        out.extend((key if len(leaves) == 1 and not isinstance(value, (list, tuple, dict)) else f"{key}_{j}", v)
                   for j, v in enumerate(leaves))
    return out


def record_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                keep_values: bool = False) -> Recorded:
    """Record ``model(*args, **kwargs)`` (the module in its current mode; the caller sets eval).

    With ``keep_values`` the value of every node is kept too (copies): what a check would get by running the
    graph again.

    Raises:
        RecordError: The forward cannot be recorded faithfully (see the module docstring); nothing was changed.
        Exception: Whatever the model's own forward raises.

    """
    tape = _Tape(model, keep_values)
    params: dict[str, str] = {}
    buffers: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight: each name, the last one used
        node = tape.placeholder(_ident("p_" + name), p)
        params[node.name] = name
        tape.state[node.name] = p
        if p.device.type != "meta":
            tape.protected[p.untyped_storage().data_ptr()] = f"parameter '{name}'"
    for name, b in model.named_buffers(remove_duplicate=False):
        node = tape.placeholder(_ident("b_" + name), b)
        buffers[node.name] = name
        tape.state[node.name] = b
        if b.device.type != "meta":
            tape.protected[b.untyped_storage().data_ptr()] = f"buffer '{name}'"
    user_inputs: list[str] = []
    for name, value in _input_names(model, args, kwargs):
        node = tape.placeholder(_ident(name), value)
        if tape.anchor is None:
            tape.anchor = node
        user_inputs.append(node.name)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            tape.protected.setdefault(value.untyped_storage().data_ptr(), f"input '{name}'")
    _, in_spec = pytree.tree_flatten((args, kwargs))
    pre = nn.modules.module.register_module_forward_pre_hook(lambda m, _a: tape.enter(m))
    post = nn.modules.module.register_module_forward_hook(lambda m, _a, _o: tape.leave(m))
    try:
        with torch.random.fork_rng(devices=[]), _exporting(), torch._C._AutoDispatchBelowAutograd(), _Mode(tape):
            out = model(*args, **kwargs)
    finally:
        pre.remove()
        post.remove()
    if tape.refused:  # the model's code caught the refusal and went on
        raise RecordError(tape.refused)
    leaves = pytree.tree_leaves(out)
    if not any(isinstance(v, torch.Tensor) for v in leaves):
        raise RecordError(f"{type(model).__name__}'s forward returned no tensor the recorder can read "
                          f"({type(out).__name__})")
    results = [tape.node_for(v) if isinstance(v, torch.Tensor) else v for v in leaves]
    tape.graph.output(tuple(results))
    for node in list(tape.graph.nodes):
        if node.target is operator.getitem and not node.users:
            tape.graph.erase_node(node)
    user_outputs = [r.name for r in results if isinstance(r, fx.Node)]
    order = [n.name for n in tape.graph.nodes if n.op == "placeholder" and n.name not in user_inputs]
    program = RecordedProgram(tape.graph, {n: tape.state[n] for n in order}, in_spec)
    outputs = [v.detach() for v in leaves if isinstance(v, torch.Tensor)]
    return Recorded(program, params, buffers, dict(tape.constants), user_inputs, user_outputs, outputs, tape.values)


LAYOUT_ONLY = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
    torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
    torch.ops.aten._assert_tensor_metadata.default,
}
"""Ops that only relayout their input: a code path may drop one where a size becomes 1 (``repeat_kv``)."""


class Diverged(RecordError):
    """A replayed forward ran an op the recorded graph does not have at that point."""


@dataclasses.dataclass
class Replayed:
    """What one replay produced: per call of the recorded graph its ``(args, kwargs)`` and output, and the outputs."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any], Any] | None]
    outputs: list[Any]


class _Replay(TorchDispatchMode):
    """Runs a forward and lines each ATen op up with the next call of a recorded graph (no graph is built)."""

    def __init__(self, expect: list[Any], copies: Container[int], protected: Container[int]) -> None:
        super().__init__()
        self.expect, self.copies, self.protected = expect, copies, protected
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Any] | None] = []
        self.refused = ""

    def stop(self, why: str) -> NoReturn:
        self.refused = self.refused or why
        raise Diverged(why)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT:
            self.stop(f"the forward reads tensor values into Python ({func})")
        if func._schema.is_mutable and _writes_into(func, args, kwargs, self.protected):
            self.stop(f"{func} writes into a parameter, buffer or input")
        out = func(*args, **kwargs)
        if func is torch.ops.aten.detach.default and isinstance(args[0], torch.Tensor):
            return out
        if func is torch.ops.aten.lift_fresh.default:
            func = torch.ops.aten.lift_fresh_copy.default
        k = len(self.calls)
        while k < len(self.expect) and self.expect[k] is not func and self.expect[k] in LAYOUT_ONLY:
            self.calls.append(None)  # a relayout the recording ran and this forward skips
            k += 1
        if k >= len(self.expect) or self.expect[k] is not func:
            self.stop(f"op #{k} is {func}, the recorded graph has "
                      f"{self.expect[k] if k < len(self.expect) else 'no more ops'}")
        # a copy where a later in-place op could change what this call computed and the caller reads it
        self.calls.append((args, kwargs, pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out)
                           if k in self.copies else out))
        return out


def _writes_into(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], storages: Container[int]) -> bool:
    """Whether ``func`` would write into a tensor whose storage is in ``storages``."""
    return any(t.untyped_storage().data_ptr() in storages for t in _written(func, args, kwargs))


def replay_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], expect: list[Any],
                copies: Container[int] = ()) -> Replayed:
    """Run ``model(*args, **kwargs)`` as :func:`record_call` would, checking its ops against ``expect``.

    ``expect`` is the op of every call node of an earlier recording (``operator.getitem`` nodes left out), in
    order. A relayout of :data:`LAYOUT_ONLY` the forward skips has None as its call. The forward runs under the
    same flags as a recording, keeps each op's arguments and output (a copy
    for the calls in ``copies``, which a later in-place op may overwrite), and builds no graph: the cheap way to
    see that a rewritten model runs the recorded program with other sizes.

    Raises:
        Diverged: An op differs from the recording's at the same position, the forward reads tensor values into
            Python or would write into a parameter, buffer or input (refused before the write), or the op count
            differs (the caller records the model instead).
        Exception: Whatever the model's own forward raises.

    """
    protected = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(),
                                                          *pytree.tree_leaves((args, kwargs))]
                 if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    mode = _Replay(expect, copies, protected)
    with torch.random.fork_rng(devices=[]), _exporting(), torch._C._AutoDispatchBelowAutograd(), mode:
        out = model(*args, **kwargs)
    if mode.refused:  # the model's code caught the exception and went on
        raise Diverged(mode.refused)
    while len(mode.calls) < len(expect) and expect[len(mode.calls)] in LAYOUT_ONLY:
        mode.calls.append(None)
    if len(mode.calls) != len(expect):
        raise Diverged(f"the forward ran {len(mode.calls)} ops, the recorded graph has {len(expect)}")
    return Replayed(mode.calls, pytree.tree_leaves(out))
