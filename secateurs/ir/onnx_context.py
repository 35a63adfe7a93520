"""The ONNX side of the rule protocol: the op rule table, the context rules run in, the literals they record.

:class:`OnnxRuleContext` keys atoms by onnx-ir values and reads static shapes and evaluated shape tensors from an
:class:`~secateurs.ir.onnx_graph.OnnxGraph`. Because an ONNX graph holds sizes as literals (a ``Reshape``
target, an ``Expand`` shape, ``Slice`` bounds, a ``Conv`` ``group``), a rule also records which literal follows
which atom (:class:`ShapeInput`, :class:`SliceBound`, :class:`AttrSize`), so the rewrite can change exactly
those. The rules themselves are in :mod:`secateurs.ir.onnx_rules`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from secateurs.errors import UnsupportedOpError
from secateurs.ir.atoms import AtomTable
from secateurs.ir.onnx_graph import OnnxGraph, Origin, origin_sources
from secateurs.ir.rules import RuleContext, Shape

__all__ = [
    "SIZE_INPUTS",
    "AttrSize",
    "OnnxFlopFn",
    "OnnxOpRule",
    "OnnxOpRuleTable",
    "OnnxRuleContext",
    "OnnxRuleFn",
    "OnnxShapeOf",
    "ShapeInput",
    "SliceBound",
]

OnnxShapeOf = Callable[[ir.Value | None], Shape | None]
OnnxRuleFn = Callable[["OnnxRuleContext", ir.Node], None]
OnnxFlopFn = Callable[[ir.Node, OnnxShapeOf], float]

_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class ShapeInput:
    """Element ``j`` of integer input ``index`` of ``node`` is the size of ``atoms[j]`` (None: it follows).

    Reshape targets, Expand shapes, Resize sizes and Split sizes hold channel counts as literals; the
    rewrite replaces each literal whose atom changes size.
    """

    node: ir.Node
    index: int
    atoms: tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class SliceBound:
    """Element ``element`` of input ``index`` (1 = starts, 2 = ends) of a Slice is a position along ``atom``.

    ``raw`` is the literal in the file (possibly negative); the rewrite maps it to the same position among
    the kept channels.
    """

    node: ir.Node
    index: int
    element: int
    atom: int
    raw: int


@dataclasses.dataclass(frozen=True)
class AttrSize:
    """Integer attribute ``name`` of ``node`` equals the size of ``atom`` (a Conv's ``group``)."""

    node: ir.Node
    name: str
    atom: int


# ----------------------------------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class OnnxOpRule:
    """One entry of the ONNX rule table."""

    domain: str
    op_type: str
    rule: OnnxRuleFn
    flops: OnnxFlopFn | None = None


class OnnxOpRuleTable:
    """Registry of op rules keyed by ``(domain, op_type)``."""

    def __init__(self) -> None:
        """Create an empty table."""
        self._rules: dict[tuple[str, str], OnnxOpRule] = {}

    def register(self, ops: Iterable[str], rule: OnnxRuleFn, *, domain: str = "",
                 flops: OnnxFlopFn | None = None) -> None:
        """Register ``rule`` for every op type in ``ops`` of ``domain``.

        Raises:
            UnsupportedOpError: An op type is not an identifier, the domain is not a string, or the op already
                has a rule.

        """
        if not isinstance(domain, str):
            raise UnsupportedOpError(f"ONNX domain must be a string, got {domain!r}")
        for op in ops:
            if not isinstance(op, str) or not _OP_NAME.match(op):
                raise UnsupportedOpError(f"{op!r} is not an ONNX op type")
            key = (_domain(domain), op)
            if key in self._rules:
                raise UnsupportedOpError(f"ONNX op {domain or 'ai.onnx'}::{op} already has a rule")
            self._rules[key] = OnnxOpRule(key[0], op, rule, flops)

    def get(self, domain: str, op_type: str) -> OnnxOpRule | None:
        """The rule for ``op_type`` in ``domain``, or None."""
        return self._rules.get((_domain(domain), op_type))

    def copy(self) -> OnnxOpRuleTable:
        """A new table with the same rules (add to it without touching this one)."""
        table = OnnxOpRuleTable()
        table._rules = dict(self._rules)
        return table

    def __contains__(self, key: object) -> bool:
        """Whether ``(domain, op_type)`` has a rule."""
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        return (_domain(str(key[0])), key[1]) in self._rules

    def __len__(self) -> int:
        """Number of ops with a rule."""
        return len(self._rules)


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


# --------------------------------------------------------------------------------------------- context
class OnnxRuleContext(RuleContext):
    """The rule context over an ONNX graph: values are onnx-ir values, keyed by their (unique) names."""

    def __init__(self, table: AtomTable, values: dict[tuple[str, int], list[int]], graph: OnnxGraph) -> None:
        """Create a context over ``table``, the value -> atoms map being built, and ``graph``."""
        super().__init__(table, values)
        self.graph = graph
        self.current: ir.Node | None = None
        self.shape_inputs: list[ShapeInput] = []
        self.slice_bounds: list[SliceBound] = []
        self.attr_sizes: list[AttrSize] = []
        self.linear_weights: set[str] = set()
        self.buffers: set[str] = set()
        self.params: set[str] = set()
        self._roots: dict[str, frozenset[str] | None] = {}

    # ------------------------------------------------------------ values
    def mixes(self, atoms: Iterable[int]) -> None:
        """Record that ``atoms`` enter a cross-channel statistic at the current node (kept per node name)."""
        atoms = list(atoms)
        if self.current is not None:
            self.mixing.setdefault(self.current.name or "", []).extend(atoms)
        super().mixes(atoms)

    def _key(self, value: Any) -> tuple[str, int]:
        if isinstance(value, ir.Value) and value.name:
            return (value.name, -1)
        raise UnsupportedOpError(f"{value!r} is not a named ONNX value")

    def shape(self, value: Any) -> Shape | None:
        """Static shape of an onnx-ir value, or None."""
        return self.graph.shape(value) if isinstance(value, ir.Value) else None

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value of a small integer tensor known before running the model, or None."""
        return self.graph.const(value)

    def ints(self, value: ir.Value | None) -> list[int] | None:
        """A known integer tensor as a flat list, or None."""
        arr = self.const(value)
        return None if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]

    def origins(self, value: ir.Value | None) -> tuple[Any, ...] | None:
        """Where each element of a known integer tensor comes from (see :data:`~secateurs.ir.onnx_graph.Origin`)."""
        if value is None or not value.name:
            return None
        return self.graph.origins.get(value.name)

    def weight_roots(self, value: ir.Value | None) -> frozenset[str] | None:
        """The initializers ``value`` is computed from when it depends on nothing else (None otherwise)."""
        if value is None or not value.name:
            return None
        if value.name in self._roots:
            return self._roots[value.name]
        self._roots[value.name] = None  # cycles cannot happen in a valid graph; this also bounds recursion
        result: frozenset[str] | None
        if self.graph.is_weight(value):
            result = frozenset([value.name])
        elif value.producer() is None or value.is_graph_input():
            result = None
        else:
            node = value.producer()
            assert node is not None
            parts = [self.weight_roots(v) for v in node.inputs if v is not None]
            if node.inputs and all(p is not None for p in parts):
                result = frozenset().union(*(p for p in parts if p is not None))
            else:
                result = None
        self._roots[value.name] = result
        return result

    def freeze_sources(self, origins: Iterable[Origin], why: str) -> None:
        """Freeze every tensor size that the given elements read (their values must not change)."""
        for origin in origins:
            for name, dim in origin_sources(origin):
                src = self.graph.value(name)
                if src is not None and self.is_tensor(src) and self.graph.shapes[name][dim] > 1:
                    self.freeze([self.dims(src)[dim]], why)

    def is_activation(self, value: ir.Value | None) -> bool:
        """Whether ``value`` depends on a graph input (as opposed to weights and constants only)."""
        return self.weight_roots(value) is None

    # ---------------------------------------------------------- linking
    def where(self) -> str:
        """Human-readable location of the current node."""
        node = self.current
        if node is None:
            return "graph"
        return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"

    # ------------------------------------------------------ annotations
    def linear_weight(self, value: ir.Value | None) -> None:
        """Record that ``value`` (or the initializers it is computed from) is a matrix-product weight."""
        roots = self.weight_roots(value)
        if roots:
            self.linear_weights.update(roots)

    def shape_input(self, node: ir.Node, index: int, atoms: Sequence[int | None]) -> None:
        """Record that input ``index`` of ``node`` holds the sizes of ``atoms`` (None: follows by itself)."""
        if any(a is not None for a in atoms):
            self.shape_inputs.append(ShapeInput(node, index, tuple(atoms)))

    def slice_bound(self, node: ir.Node, index: int, element: int, atom: int, raw: int) -> None:
        """Record that a Slice bound is a position along ``atom``."""
        self.slice_bounds.append(SliceBound(node, index, element, atom, raw))

    def attr_size(self, node: ir.Node, name: str, atom: int) -> None:
        """Record that integer attribute ``name`` of ``node`` equals the size of ``atom``."""
        self.attr_sizes.append(AttrSize(node, name, atom))


SIZE_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Slice": frozenset({1, 2}), "Split": frozenset({1}),
    "Resize": frozenset({3}),
}
"""Integer inputs whose elements' origins the rules handle; sizes read by any other input are frozen."""
