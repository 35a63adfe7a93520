"""The captured graph: an ATen-level FX graph plus the module it came from."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import fx, nn

from secateurs.errors import PassContractError

__all__ = ["Graph", "RecordedProgram", "is_dead", "tensor_shape"]

_T = TypeVar("_T")


def is_dead(node: Any) -> bool:
    """A call whose value nothing reads and which mutates nothing (a cache an export left behind)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and not node.users and schema is not None and not schema.is_mutable


def tensor_shape(value: Any) -> tuple[int, ...] | None:
    """The static shape of a traced value (``node.meta['val']``), or None for a non-tensor."""
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


@dataclasses.dataclass
class RecordedProgram:
    """A program recorded from one eager forward (``secateurs.frontends.record``), laid out as an export's.

    Attributes:
        graph: The recorded FX graph (placeholders: parameters, buffers, constants, then user inputs).
        state: Placeholder name -> the parameter, buffer or constant tensor it held when recorded (a later
            rewrite of the module replaces tensors; this program keeps computing with the recorded ones).
        in_spec: The pytree spec of ``(args, kwargs)`` it was recorded on.

    """

    graph: fx.Graph
    state: dict[str, torch.Tensor]
    in_spec: Any
    _module: fx.GraphModule | None = dataclasses.field(default=None, repr=False)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The graph as a runnable module (generated on first use: it costs a code generation)."""
        if self._module is None:
            self._module = fx.GraphModule(nn.Module(), self.graph)
        return self._module

    def flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The values of every placeholder, in order, for ``(args, kwargs)`` laid out as when recorded.

        Raises:
            ValueError: The inputs are structured differently.

        """
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(f"inputs structured as {spec}, recorded on {self.in_spec}")
        return [*self.state.values(), *leaves]


@dataclasses.dataclass
class Graph:
    """A model captured into an ATen-level FX graph (recorded from one forward, or with ``torch.export``).

    Attributes:
        module: The original ``nn.Module``; width pruning rewrites it in place.
        program: The ``ExportedProgram`` (ATen training IR).
        args: Positional example inputs used for capture.
        kwargs: Keyword example inputs used for capture.
        params: Placeholder node name -> parameter name in ``module``.
        buffers: Placeholder node name -> buffer name in ``module``.
        constants: Placeholder node name -> lifted constant name (never sliced).
        user_inputs: Names of placeholder nodes fed by the caller.
        user_outputs: Names of nodes returned to the caller.
        analyses: Typed analysis results written by analysis passes, keyed by their class.
        capture: How it was captured: ``"record"`` (one eager forward recorded at the ATen level) or
            ``"export"`` (``torch.export``).
        outputs: With ``"record"``: the output tensors of the recorded forward (detached), the dense outputs a
            final check compares with, without another forward.
        values: Node name -> the value it computed in the recorded forward, when the capture was asked to keep
            them (a verification's capture of the pruned model: its check then runs no second forward).
        derived: Derived from an earlier capture by replaying the rewritten model against it
            (:mod:`secateurs.frontends.derive`) rather than recorded: every node's traced value and literals are
            the replay's, a constant tensor made inside the forward is the earlier capture's. A pass manager
            captures the model again before another pass reads such a graph.

    """

    module: nn.Module
    program: torch.export.ExportedProgram | RecordedProgram
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    params: dict[str, str]
    buffers: dict[str, str]
    constants: dict[str, str]
    user_inputs: list[str]
    user_outputs: list[str]
    analyses: dict[type, Any] = dataclasses.field(default_factory=dict)

    capture: str = "export"
    outputs: list[torch.Tensor] | None = None
    values: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    derived: bool = False

    @property
    def fx_graph(self) -> fx.Graph:
        """The FX graph of the captured program."""
        return self.program.graph

    @property
    def graph_module(self) -> fx.GraphModule:
        """The runnable FX module of the captured program (run it on :meth:`flat_inputs`)."""
        return self.program.graph_module

    def interpreter_root(self) -> nn.Module:
        """The module an ``fx.Interpreter`` of :attr:`fx_graph` runs against (its ``get_attr`` targets)."""
        if isinstance(self.program, RecordedProgram):
            return nn.Module()  # a recorded graph has no get_attr: no code generation needed to run it
        return self.program.graph_module

    def flat_inputs(self) -> list[Any]:
        """The value of every placeholder for the example inputs: state tensors as captured, then the inputs."""
        if isinstance(self.program, RecordedProgram):
            return self.program.flat_inputs(self.args, self.kwargs)
        return list(self.program._graph_module_flat_inputs(self.args, self.kwargs))

    def nodes(self) -> list[fx.Node]:
        """Graph nodes in topological order."""
        return list(self.program.graph.nodes)

    def node(self, name: str) -> fx.Node:
        """The node called ``name`` (indexed on first use, again when the graph gained or renamed nodes)."""
        index: dict[str, fx.Node] | None = self.__dict__.get("_node_index")
        hit = index.get(name) if index is not None else None
        if hit is None or hit.name != name:
            index = {n.name: n for n in self.program.graph.nodes}
            self.__dict__["_node_index"] = index
            hit = index.get(name)
            if hit is None:
                raise KeyError(name)
        return hit

    def state_tensor(self, name: str) -> torch.Tensor:
        """The tensor the capture holds for parameter or buffer ``name`` (the module may have replaced it since).

        Raises:
            KeyError: No placeholder holds ``name``.

        """
        if not isinstance(self.program, RecordedProgram):
            return self.program.state_dict[name]
        for placeholder, fqn in [*self.params.items(), *self.buffers.items()]:
            if fqn == name:
                return self.program.state[placeholder]
        raise KeyError(name)

    def state_name(self, placeholder: str) -> str | None:
        """Parameter or buffer name behind a placeholder, or None."""
        return self.params.get(placeholder) or self.buffers.get(placeholder)

    def analysis(self, kind: type[_T]) -> _T:
        """The analysis result of type ``kind``.

        Raises:
            PassContractError: No pass has produced it yet.

        """
        try:
            return self.analyses[kind]  # type: ignore[no-any-return]
        except KeyError:
            raise PassContractError(f"analysis {kind.__name__} is required but has not been run") from None

    def param_count(self) -> int:
        """Number of distinct parameter elements in the module."""
        seen: set[int] = set()
        total = 0
        for p in self.module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
