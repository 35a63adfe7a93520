"""The op rule table: how channels flow through each op kind, declared once per op.

A rule receives a :class:`RuleContext` and the FX node, and states which dimensions of its inputs and
outputs are the same channels (``ctx.unify``), how a dimension splits into a product or concatenation of
others, and which dimensions must be frozen. Every output dimension a rule leaves unlinked is frozen by the
engine (its size is computed by the op, e.g. a conv's spatial size), so a rule can never silently leave a
channel free. Ops with no rule freeze every dimension they touch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx

from secateurs.errors import UnsupportedOpError
from secateurs.ir.atoms import AtomTable, RefinementConflict
from secateurs.ir.graph import tensor_shape

__all__ = [
    "RULES",
    "SYNCED_SIZES",
    "ConsumerUse",
    "FlopFn",
    "OpRule",
    "OpRuleTable",
    "RuleContext",
    "RuleFn",
    "op_rule",
]

Shape = tuple[int, ...]
# Size attributes that the rewrite re-syncs from a module's tensors after pruning
# (:func:`secateurs.modeling.hf_attributes.sync_module`): a tensor the module's code allocates at one of these
# sizes follows the pruned width, so a factory dim of that size is not frozen (the re-capture verifies it).
SYNCED_SIZES = ("intermediate_size",)
ShapeOf = Callable[[Any], Shape | None]
RuleFn = Callable[["RuleContext", fx.Node], None]
FlopFn = Callable[[fx.Node, ShapeOf], float]


@dataclasses.dataclass(frozen=True)
class ConsumerUse:
    """A node that contracts an input activation's channel dim against a weight dim (linear, conv).

    Activation-based importance reads the activation at ``input_node`` along ``input_dim`` and the weight
    placeholder ``weight_node`` along ``weight_dim``.
    """

    node: str
    input_node: str
    input_dim: int
    weight_node: str
    weight_dim: int


@dataclasses.dataclass(frozen=True)
class OpRule:
    """One entry of the rule table."""

    op: Any
    rule: RuleFn
    flops: FlopFn | None = None


class OpRuleTable:
    """Registry of op rules keyed by ATen ``OpOverload`` (or another FX call target)."""

    def __init__(self) -> None:
        """Create an empty table."""
        self._rules: dict[Any, OpRule] = {}
        self._named: dict[str, OpRule] = {}  # ops of libraries that may not be loaded yet, by qualified name

    def register(self, ops: Iterable[Any], rule: RuleFn, flops: FlopFn | None = None) -> None:
        """Register ``rule`` for every op in ``ops``.

        Raises:
            UnsupportedOpError: An op is not an overload (a packet like ``aten.add`` is ambiguous), or it
                already has a rule.

        """
        for op in ops:
            if isinstance(op, torch._ops.OpOverloadPacket):
                raise UnsupportedOpError(f"register an overload such as {op}.default, not the packet {op}")
            if not (isinstance(op, torch._ops.OpOverload) or callable(op)):
                raise UnsupportedOpError(f"{op!r} is not an op")
            if op in self._rules:
                raise UnsupportedOpError(f"op {op} already has a rule")
            self._rules[op] = OpRule(op, rule, flops)

    def register_named(self, names: Iterable[str], rule: RuleFn, flops: FlopFn | None = None) -> None:
        """Register ``rule`` for ops named like ``"transformers.grouped_mm_fallback.default"`` (``str(overload)``).

        For custom ops of a library that registers them only when it is imported: the rule applies once the op
        exists, without importing the library here.

        Raises:
            UnsupportedOpError: A name has no namespace and overload (``ns.op.overload``) or already has a rule.

        """
        for name in names:
            if name.count(".") < 2:
                raise UnsupportedOpError(f"{name!r} is not a qualified op name such as 'ns.op.default'")
            if name in self._named:
                raise UnsupportedOpError(f"op {name} already has a rule")
            self._named[name] = OpRule(name, rule, flops)

    def get(self, op: Any) -> OpRule | None:
        """The rule for ``op``, or None."""
        found = self._rules.get(op)
        if found is None and isinstance(op, torch._ops.OpOverload):
            found = self._named.get(str(op))
        return found

    def copy(self) -> OpRuleTable:
        """A new table with the same rules (add to it without touching this one)."""
        table = OpRuleTable()
        table._rules, table._named = dict(self._rules), dict(self._named)
        return table

    def __contains__(self, op: Any) -> bool:
        """Whether ``op`` has a rule."""
        return self.get(op) is not None

    def __len__(self) -> int:
        """Number of ops with a rule."""
        return len(self._rules) + len(self._named)


RULES = OpRuleTable()


def op_rule(*ops: Any, flops: FlopFn | None = None) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering a rule function for ``ops`` in :data:`RULES`."""

    def deco(fn: RuleFn) -> RuleFn:
        RULES.register(ops, fn, flops)
        return fn

    return deco


class RuleContext:
    """What a rule may do: read shapes, get dimension atoms, unify, refine and freeze them."""

    def __init__(self, table: AtomTable, graph_values: dict[tuple[str, int], list[int]]) -> None:
        """Create a context over ``table`` and the value -> atoms map being built."""
        self.table = table
        self.values = graph_values
        self.node: fx.Node | None = None
        self.linked: set[int] = set()
        self.ever_linked: set[int] = set()
        self.consumers: list[ConsumerUse] = []
        self.module_attrs: list[tuple[str, str, int]] = []
        self.mixing: dict[str, list[int]] = {}
        self.weights: set[str] = set()  # placeholders of parameters, buffers and constants
        self.root: Any = None  # the captured module (to read the attributes of the module running a node)
        self._activation: dict[str, bool] = {}

    # ------------------------------------------------------------ values
    def is_activation(self, value: Any) -> bool:
        """Whether ``value`` depends on a graph input (as opposed to parameters, buffers and constants only)."""
        node = value[0] if isinstance(value, tuple) else value
        if not isinstance(node, fx.Node):
            return False
        memo, stack = self._activation, [node]
        while stack:
            top = stack[-1]
            if top.name in memo:
                stack.pop()
                continue
            if top.op == "placeholder":
                memo[top.name] = top.name not in self.weights
                stack.pop()
                continue
            todo = [n for n in top.all_input_nodes if n.name not in memo]
            if todo:
                stack.extend(todo)
                continue
            memo[top.name] = any(memo[n.name] for n in top.all_input_nodes)
            stack.pop()
        return memo[node.name]

    def module_of(self, node: fx.Node) -> Any:
        """The innermost module whose ``forward`` ran ``node`` (from ``nn_module_stack``), or None."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack or self.root is None:
            return None
        path = list(stack.values())[-1][0]
        try:
            return self.root.get_submodule(path) if path else self.root
        except AttributeError:
            return None

    def _key(self, value: Any) -> tuple[str, int]:
        if isinstance(value, tuple):
            node, index = value
            return (node.name, int(index))
        if isinstance(value, fx.Node):
            return (value.name, -1)
        raise UnsupportedOpError(f"{value!r} is not a graph value")

    def shape(self, value: Any) -> Shape | None:
        """Static shape of a graph value (a node, or ``(node, i)`` for the i-th output), or None."""
        if isinstance(value, tuple):
            node, index = value
            val = node.meta.get("val")
            if isinstance(val, (list, tuple)) and index < len(val):
                return tensor_shape(val[index])
            return None
        if isinstance(value, fx.Node):
            return tensor_shape(value.meta.get("val"))
        return None

    def is_tensor(self, value: Any) -> bool:
        """Whether ``value`` is a tensor-valued graph value."""
        return self.shape(value) is not None

    def dims(self, value: Any) -> list[int]:
        """The atoms of ``value``'s dimensions (created on first use)."""
        key = self._key(value)
        atoms = self.values.get(key)
        if atoms is None:
            shape = self.shape(value)
            if shape is None:
                raise UnsupportedOpError(f"{key[0]} is not a tensor")
            atoms = [self.table.new(s) for s in shape]
            self.values[key] = atoms
        return atoms

    def alias(self, value: Any, source: Any) -> None:
        """Make ``value`` share ``source``'s atoms (e.g. ``getitem`` of a multi-output op)."""
        self.values[self._key(value)] = self.dims(source)

    # ---------------------------------------------------------- linking
    def where(self) -> str:
        """Human-readable location of the current node."""
        node = self.node
        return f"node '{node.name}' ({node.target})" if node is not None else "graph"

    def mark(self, *atoms: int) -> None:
        """Record that the current rule understood ``atoms`` (unlinked dims get frozen)."""
        self.linked.update(atoms)
        self.ever_linked.update(atoms)

    def unify(self, a: int, b: int) -> None:
        """Declare atoms ``a`` and ``b`` the same channels; an irreconcilable pair is frozen instead."""
        self.mark(a, b)
        self.table.where = self.where()
        try:
            self.table.unify(a, b)
        except RefinementConflict as exc:
            reason = f"incompatible channel structure at {self.where()}: {exc}"
            self.table.freeze(a, reason)
            self.table.freeze(b, reason)

    def unify_dims(self, a: Any, da: int, b: Any, db: int) -> None:
        """Unify dimension ``da`` of value ``a`` with dimension ``db`` of value ``b``."""
        self.unify(self.dims(a)[da], self.dims(b)[db])

    def same_dims(self, a: Any, b: Any) -> None:
        """Unify all dimensions of two values of identical shape."""
        for x, y in zip(self.dims(a), self.dims(b), strict=True):
            self.unify(x, y)

    def broadcast(self, out: Any, inputs: Sequence[Any]) -> None:
        """Numpy-style broadcasting: each non-broadcast input dim is the same as the output dim."""
        out_dims = self.dims(out)
        out_shape = self.shape(out)
        assert out_shape is not None
        for value in inputs:
            shape = self.shape(value)
            if shape is None:
                continue
            offset = len(out_shape) - len(shape)
            if offset < 0:
                self.freeze_value(value, "broadcast with more dims than the result")
                continue
            for i, size in enumerate(shape):
                if size == out_shape[offset + i]:
                    self.unify(self.dims(value)[i], out_dims[offset + i])

    def product(self, atoms: Sequence[int]) -> int:
        """An atom that is the row-major product of ``atoms``."""
        self.mark(*atoms)
        return self.table.product(atoms)

    def concat(self, atoms: Sequence[int]) -> int:
        """An atom that is the concatenation of ``atoms``."""
        self.mark(*atoms)
        return self.table.concat(atoms)

    def new(self, size: int) -> int:
        """A fresh atom."""
        return self.table.new(size)

    def split(self, atom: int, kind: str, sizes: Sequence[int]) -> tuple[int, ...] | None:
        """Refine ``atom`` into parts of ``sizes``; None (and the atom frozen) when impossible."""
        self.mark(atom)
        self.table.where = self.where()
        try:
            return self.table.split(atom, kind, sizes)
        except RefinementConflict as exc:
            self.table.freeze(atom, f"incompatible channel structure at {self.where()}: {exc}")
            return None

    def freeze(self, atoms: Iterable[int], why: str, *, channel: bool | None = True) -> None:
        """Freeze ``atoms`` with a reason naming the current node (``channel``: see :meth:`AtomTable.freeze`)."""
        for a in atoms:
            self.mark(a)
            self.table.freeze(a, f"{why} at {self.where()}", channel=channel)

    def tag(self, atoms: Iterable[int], kind: str) -> None:
        """Name the structure ``atoms`` are (``heads``, ``kv_groups``) so groups can be classified."""
        for a in atoms:
            self.table.tag(a, kind)

    def mixes(self, atoms: Iterable[int]) -> None:
        """Record that ``atoms`` enter a cross-channel statistic here (pruning them is never exact)."""
        atoms = list(atoms)
        if self.node is not None:
            self.mixing.setdefault(self.node.name, []).extend(atoms)
        for a in atoms:
            self.table.mark_mixed(a, self.where())

    def freeze_value(self, value: Any, why: str) -> None:
        """Freeze every dimension of ``value``."""
        if self.is_tensor(value):
            self.freeze(self.dims(value), why)

    # ------------------------------------------------------ annotations
    def consumer(self, input_node: fx.Node, input_dim: int, weight_node: fx.Node, weight_dim: int) -> None:
        """Record that the current node contracts ``input_node[input_dim]`` with a weight dim."""
        assert self.node is not None
        self.consumers.append(
            ConsumerUse(self.node.name, input_node.name, input_dim, weight_node.name, weight_dim)
        )

    def module_attr(self, weight: fx.Node, attr: str, atom: int) -> None:
        """Record that the module owning ``weight`` has integer attribute ``attr`` equal to ``atom``'s size."""
        self.module_attrs.append((weight.name, attr, atom))


