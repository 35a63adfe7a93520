"""Reading the arguments of an ATen call in an FX graph (shared by the ATen rule modules)."""

from __future__ import annotations

from typing import Any

from torch import fx

from secateurs.ir.rules import RuleContext

__all__ = ["arg", "tensor_args"]


def arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call, positional or keyword, else ``default``."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name == name:
                return node.args[i] if i < len(node.args) else default
    return default


def tensor_args(ctx: RuleContext, node: fx.Node) -> list[fx.Node]:
    """The tensor arguments of an ATen call (positional, keyword, or inside a list) in order."""
    out: list[fx.Node] = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and ctx.is_tensor(a):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node) and ctx.is_tensor(x))
    return out
