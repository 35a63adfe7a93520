"""The captured graph: an ATen-level FX graph plus the module it came from."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import fx, nn

from secateurs.errors import PassContractError

__all__ = ["Graph", "is_dead", "tensor_shape"]

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
class Graph:
    """A model captured with ``torch.export``.

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

    """

    module: nn.Module
    program: torch.export.ExportedProgram
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    params: dict[str, str]
    buffers: dict[str, str]
    constants: dict[str, str]
    user_inputs: list[str]
    user_outputs: list[str]
    analyses: dict[type, Any] = dataclasses.field(default_factory=dict)

    @property
    def fx_graph(self) -> fx.Graph:
        """The FX graph of the exported program."""
        return self.program.graph

    def nodes(self) -> list[fx.Node]:
        """Graph nodes in topological order."""
        return list(self.program.graph.nodes)

    def node(self, name: str) -> fx.Node:
        """The node called ``name``."""
        for n in self.program.graph.nodes:
            if n.name == name:
                return n
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
