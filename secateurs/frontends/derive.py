"""The capture of a rewritten model derived from the dense one's: one replayed forward instead of a new recording.

A width rewrite changes sizes, not the program: the pruned model runs the recorded ops in the same order with
other shapes (and other size literals: ``view(b, t, 8, 64)`` becomes ``view(b, t, 6, 64)``). So instead of
recording it again, the dense graph is copied node by node while the pruned forward is replayed against it
(:func:`secateurs.frontends.record.replay_call`): each copied node takes the replayed op's output as its traced
value and the replayed call's literals as its constant arguments. Parameters and buffers are the module's
current tensors. For every node that gives the op, traced value and literals a new recording would give, without
building a graph during the forward (``tests/test_cheap_check.py`` compares the two node by node). Where the
forward departs from the recorded program (another op, another op count, another argument structure),
:class:`~secateurs.frontends.record.Diverged` tells the caller to record it instead.

What it does not see: the data flow is the recording's (which earlier op produced each argument is not checked
again; the caller's masked run checks what the values mean), node names stay the dense graph's where a skipped
relayout would renumber a new recording's, and a constant tensor created inside the forward (``torch.tensor(...)``
of a size) keeps its recorded value. Such a graph is marked ``derived``, and a pass manager captures the model
again before another pass reads it.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Collection
from typing import Any

import torch
from torch import fx

from secateurs.frontends.record import Diverged, _meta, replay_call
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.graph import Graph, RecordedProgram

__all__ = ["Derived", "derive_capture", "recapture"]


def _relit(recorded: Any, live: Any, remap: dict[fx.Node, fx.Node]) -> Any:
    """The recorded argument ``recorded`` with its node references remapped and its literals taken from ``live``."""
    if isinstance(recorded, fx.Node):
        if not isinstance(live, torch.Tensor):
            raise Diverged(f"an argument recorded as node '{recorded.name}' is {type(live).__name__} now")
        return remap[recorded]
    if isinstance(recorded, (list, tuple)) and not hasattr(recorded, "_fields"):
        if not isinstance(live, (list, tuple)) or len(live) != len(recorded):
            raise Diverged(f"an argument recorded as {recorded!r} is {live!r} now")
        out = [_relit(a, b, remap) for a, b in zip(recorded, live, strict=True)]
        return out if type(recorded) is list else type(recorded)(out)
    if isinstance(recorded, dict):
        if not isinstance(live, dict) or live.keys() != recorded.keys():
            raise Diverged(f"keyword arguments {sorted(recorded)} are {sorted(live) if isinstance(live, dict) else live}")
        return {k: _relit(v, live[k], remap) for k, v in recorded.items()}
    if isinstance(live, torch.Tensor):
        raise Diverged(f"an argument recorded as the constant {recorded!r} is a tensor now")
    return live


def _attribute(module: torch.nn.Module, path: str) -> torch.Tensor | None:
    try:
        value = operator.attrgetter(path)(module)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


@dataclasses.dataclass
class Derived:
    """A derived capture: the graph, the partner map (dense node name -> its node) and the forward's output leaves."""

    graph: Graph
    partner: dict[str, fx.Node]
    outputs: list[Any]


def derive_capture(graph: Graph, *, copy: Collection[str] = ()) -> Derived:
    """Replay ``graph.module`` (already rewritten) against ``graph``'s recording and derive its capture.

    Args:
        graph: A recorded capture (``capture == "record"``) of the module before its rewrite.
        copy: Dense nodes whose replayed value is copied as it is computed (a later in-place op of the forward
            would change it, and the caller reads it).

    Returns:
        The derived graph (with ``values``: node name -> the replayed value, ``outputs``: the forward's output
        tensors, and ``derived`` set), the partner map and the output leaves.

    Raises:
        Diverged: The forward departs from the recorded program.
        Exception: Whatever the model's own forward raises.

    """
    dense = graph.fx_graph
    calls = [n for n in dense.nodes if n.op == "call_function" and n.target is not operator.getitem]
    expect = [n.target for n in calls]
    copied = {graph.node(name) for name in copy}
    copied |= {n.args[0] for n in list(copied) if n.target is operator.getitem and isinstance(n.args[0], fx.Node)}
    module = graph.module
    modes = {m: m.training for m in module.modules() if m.training}  # recorded in eval mode: replayed in it
    for m in modes:
        m.training = False
    try:
        replayed = replay_call(module, graph.args, graph.kwargs, expect,
                               copies={i for i, n in enumerate(calls) if n in copied})
    finally:
        for m, mode in modes.items():
            m.training = mode
    live = dict(zip(calls, replayed.calls, strict=True))
    tensors = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(
        remove_duplicate=False))}
    assert isinstance(graph.program, RecordedProgram)
    old_state = graph.program.state
    state: dict[str, torch.Tensor] = {}
    inputs = iter(torch.utils._pytree.tree_leaves((graph.args, graph.kwargs)))
    values: dict[str, Any] = {}
    new = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    for n in dense.nodes:
        if n.op == "placeholder":
            node = new.placeholder(n.name)
            fqn = graph.params.get(n.name) or graph.buffers.get(n.name)
            if n.name in graph.user_inputs:
                value: Any = next(inputs)
            elif fqn is not None:
                value = state[n.name] = tensors[fqn]
            else:  # a constant: the module attribute it names now, else (made in the forward) as recorded
                target = graph.constants.get(n.name, "")
                now = _attribute(module, target) if target else None
                value = state[n.name] = now if now is not None else old_state[n.name]
            node.meta.update(n.meta)  # in place: assigning a node's attribute re-indexes the graph
            node.meta["val"] = _meta(value)
        elif n.op == "call_function":
            if n.target is operator.getitem:
                value = values[n.args[0].name][n.args[1]]  # type: ignore[union-attr,index]
                args, kwargs = (remap[n.args[0]], n.args[1]), dict[str, Any]()  # type: ignore[index]
            elif live[n] is None:  # a relayout this forward skipped: its users read its input
                source = n.args[0]
                if not isinstance(source, fx.Node):
                    raise Diverged(f"node '{n.name}' was skipped but reads no node")
                remap[n], values[n.name] = remap[source], values[source.name]
                continue
            else:
                call_args, call_kwargs, value = live[n]  # type: ignore[misc]
                args = _relit(n.args, call_args, remap)
                kwargs = _relit(dict(n.kwargs), call_kwargs, remap) if n.kwargs or call_kwargs else {}
            node = new.create_node("call_function", n.target, args, kwargs, name=n.name)
            node.meta.update(n.meta)  # in place: assigning a node's attribute re-indexes the graph
            node.meta["val"] = _meta(value)
        elif n.op == "output":
            node = new.output(fx.node.map_arg(n.args[0], remap.__getitem__))
        else:
            raise Diverged(f"node '{n.name}' ({n.op}) is not of a recorded graph")
        remap[n] = node
        values[node.name] = value
    if any(remap[n].name != n.name for n in dense.nodes if n.op != "output" and live.get(n, ()) is not None):
        raise Diverged("node names changed while deriving the graph")
    program = RecordedProgram(new, {name: state[name] for name in old_state}, graph.program.in_spec)
    outputs = [v.detach() for v in replayed.outputs if isinstance(v, torch.Tensor)]
    derived = Graph(module=module, program=program, args=graph.args, kwargs=graph.kwargs, params=dict(graph.params),
                    buffers=dict(graph.buffers), constants=dict(graph.constants),
                    user_inputs=list(graph.user_inputs), capture="record",
                    user_outputs=[remap[graph.node(name)].name for name in graph.user_outputs],
                    outputs=outputs, values=values, derived=True)
    partner = {n.name: remap[n] for n in dense.nodes
               if n.op in ("placeholder", "call_function") and live.get(n, ()) is not None}
    return Derived(derived, partner, replayed.outputs)


def recapture(graph: Graph) -> Graph:
    """A fresh capture of ``graph``'s module on its example inputs, as the derived graph's first one was made."""
    return capture_call(graph.module, graph.args, graph.kwargs)
