"""The ONNX IR: an onnx-ir model plus the static facts the channel analysis reads.

An ONNX file may leave the batch or sequence size symbolic. The analysis needs an integer size for every
dimension of every value, so the frontend (:mod:`secateurs.frontends.onnx_model`) substitutes a concrete size
for each symbolic dimension and propagates static shapes through the graph. Small integer tensors computed from
shapes and constants (``Shape -> Gather -> Concat -> Reshape``) are evaluated on the way, and each of their
elements remembers where it came from: a literal in the file, the size of a tensor dimension (read with
``Shape``), or arithmetic on such sizes. The op rules use this to decide whether a ``Reshape`` target follows
a pruned dimension by itself or holds a literal that the rewrite must change.

The file itself is never made static: the rewrite changes literals and initializers, and symbolic dimensions
stay symbolic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

from secateurs.errors import PassContractError

__all__ = ["Computed", "DimOrigin", "OnnxGraph", "Origin", "origin_sources"]

_T = TypeVar("_T")

DimOrigin = tuple[str, int]
"""Origin of an element equal to the size of dimension ``dim`` of the value called ``name``."""


@dataclasses.dataclass(frozen=True)
class Computed:
    """Origin of an element computed by arithmetic on tensor sizes.

    Attributes:
        sources: The ``(value name, dim)`` sizes it reads. Its value changes in an unknown way when any of
            them changes, so whatever it sizes can only stay valid if they are frozen.

    """

    sources: frozenset[DimOrigin] = frozenset()


Origin = DimOrigin | Computed | None
"""Where one element of an evaluated integer tensor comes from: None (a literal in the file), a
:data:`DimOrigin`, or :class:`Computed`."""


def origin_sources(origin: Origin) -> frozenset[DimOrigin]:
    """The tensor sizes an element reads (empty for a literal)."""
    if origin is None:
        return frozenset()
    if isinstance(origin, Computed):
        return origin.sources
    return frozenset([origin])


@dataclasses.dataclass
class OnnxGraph:
    """An ONNX model loaded for pruning.

    Attributes:
        model: The onnx-ir model; transform passes rewrite it in place.
        path: The file it came from, or None.
        shapes: Static shape of every value whose shape is known, by value name (symbolic dims replaced by
            the sizes in ``symbols``).
        dtypes: Element type of every value whose type is known, by value name.
        consts: Values of the small integer tensors evaluated from constants and shapes, by value name.
        origins: Per flat element of each tensor in ``consts``, where the element comes from.
        symbols: The size chosen for each symbolic dimension (by symbol name; unnamed ones as ``input:dim``).
        display: A readable name for initializers the exporter renamed (``val_92`` -> the PyTorch parameter
            it was folded from).
        buffers: Initializers that hold statistics or tables rather than trained weights (not scored).
        untied: Initializer copies made so that each use of a shared initializer can be sliced on its own,
            mapped to the initializer they copy.
        analyses: Typed analysis results written by analysis passes, keyed by their class.

    """

    model: ir.Model
    path: str | None
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, ir.DataType]
    consts: dict[str, np.ndarray]
    origins: dict[str, tuple[Origin, ...]]
    symbols: dict[str, int]
    display: dict[str, str] = dataclasses.field(default_factory=dict)
    buffers: set[str] = dataclasses.field(default_factory=set)
    untied: dict[str, str] = dataclasses.field(default_factory=dict)
    analyses: dict[type, Any] = dataclasses.field(default_factory=dict)
    _names: dict[str, ir.Value] | None = dataclasses.field(default=None, repr=False)

    @property
    def graph(self) -> ir.Graph:
        """The main graph."""
        return self.model.graph

    def opset(self, domain: str = "") -> int:
        """The opset version imported for ``domain`` (0 when it is not imported)."""
        return int(self.model.opset_imports.get(domain, 0))

    def value(self, name: str) -> ir.Value | None:
        """The value called ``name`` in the main graph (an input, initializer or node output), or None."""
        if self._names is None:
            self._names = self._index()
        return self._names.get(name)

    def invalidate(self) -> None:
        """Forget cached lookups and every analysis (after the model was rewritten)."""
        self._names = None
        self.analyses.clear()

    def _index(self) -> dict[str, ir.Value]:
        index: dict[str, ir.Value] = {}
        for v in self.graph.inputs:
            if v.name:
                index[v.name] = v
        for name, v in self.graph.initializers.items():
            index[name] = v
        for node in self.graph:
            for o in node.outputs:
                if o.name:
                    index[o.name] = o
        return index

    def shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        """Static shape of ``value``, or None when unknown."""
        if value is None or not value.name:
            return None
        return self.shapes.get(value.name)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value of a small integer tensor known before running the model, or None."""
        if value is None or not value.name:
            return None
        return self.consts.get(value.name)

    def is_weight(self, value: ir.Value | None) -> bool:
        """Whether ``value`` is an initializer (a tensor stored in the file)."""
        return value is not None and value.is_initializer() and not value.is_graph_input()

    def array(self, name: str) -> np.ndarray:
        """The contents of initializer ``name``.

        Raises:
            PassContractError: There is no such initializer.

        """
        value = self.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise PassContractError(f"'{name}' is not an initializer of the ONNX graph")
        return value.const_value.numpy()

    def display_name(self, name: str) -> str:
        """The readable name of initializer ``name``."""
        return self.display.get(name, name)

    def param_count(self) -> int:
        """Number of elements in floating-point initializers that are not buffers (shared tensors once)."""
        total = 0
        seen: set[int] = set()
        for name, value in self.graph.initializers.items():
            tensor = value.const_value
            if name in self.buffers or tensor is None or not tensor.dtype.is_floating_point() or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += int(np.prod(tensor.shape.numpy(), dtype=np.int64))
        return total

    def analysis(self, kind: type[_T]) -> _T:
        """The analysis result of type ``kind``.

        Raises:
            PassContractError: No pass has produced it yet.

        """
        try:
            return self.analyses[kind]  # type: ignore[no-any-return]
        except KeyError:
            raise PassContractError(f"analysis {kind.__name__} is required but has not been run") from None
