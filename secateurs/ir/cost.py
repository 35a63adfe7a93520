"""One cost model for both dialects: parameters and FLOPs of a graph, now or under a pruning plan.

The model reads only the dependency analysis (every tracked value's channel atoms, and what each value's shape
becomes when each group keeps ``kept[g]`` channels), so it is written once for ATen and ONNX. A dialect gives it
three things (:func:`secateurs.ir.aten_cost.aten_costs`, :func:`secateurs.ir.onnx_depgraph.onnx_costs`):

- the weights the analysis tracks (each tensor once) and the parameter count of the rest, which no plan changes;
- its FLOP terms: each op node with the FLOP function of its rule (``(node, shape_of) -> FLOPs``), where
  ``shape_of`` maps the node's values to their shapes under the plan;
- how a value of the dialect is named as an analysis key (and, for values the analysis does not track, its
  static shape, if the dialect trusts it).

The FLOP formulas are written once too, on shapes (:func:`matmul_flops`, :func:`conv_flops`, ...): the
dialects' rule tables only read a node's shapes and call them. A multiply-add counts 2; only matmul-like ops
(linear, matmul / Gemm, convolutions, attention, grouped expert matmuls) count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["Analysis", "CostModel", "attention_flops", "conv_flops", "conv_transpose_flops", "grouped_mm_flops",
           "matmul_flops", "numel"]

Shape = tuple[int, ...]
Key = tuple[str, int]
ShapeOf = Callable[[Any], Shape | None]
FlopFn = Callable[[Any, ShapeOf], float]


def numel(shape: Sequence[int] | None) -> int:
    """Elements of a tensor of ``shape`` (0 when unknown)."""
    return math.prod(shape) if shape is not None else 0


def matmul_flops(out: Shape | None, k: int) -> float:
    """A product contracting ``k`` elements into each of ``out``'s: linear, matmul, Gemm, addmm."""
    return 2.0 * numel(out) * k


def conv_flops(out: Shape | None, weight: Shape | None) -> float:
    """A convolution: every output element reads one filter (``weight[1:]``: input channels per group x kernel)."""
    return 2.0 * numel(out) * numel(weight[1:]) if out and weight else 0.0


def conv_transpose_flops(x: Shape | None, weight: Shape | None) -> float:
    """A transposed convolution: every input element is scattered through one filter (``weight[1:]``)."""
    return 2.0 * numel(x) * numel(weight[1:]) if x and weight else 0.0


def attention_flops(q: Shape | None, k: Shape | None, v: Shape | None) -> float:
    """Fused attention ``softmax(q k^T) v``: scores (``q_len x k_len x head_dim``) plus the weighted sum."""
    if not (q and k and v):
        return 0.0
    return 2.0 * numel(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def grouped_mm_flops(x: Shape | None, w: Shape | None) -> float:
    """Tokens ``[S, in]`` through expert matrices ``[E, in, out]``: each token through one expert."""
    return 2.0 * x[0] * x[1] * w[-1] if x and w and len(x) == 2 else 0.0


class Analysis(Protocol):
    """What the cost model reads of a dependency analysis (both dialects' ``DependencyInfo``)."""

    @property
    def values(self) -> Mapping[Key, Sequence[int]]:
        """Every tracked value's channel atoms, per dim."""

    def shape_under(self, value: Key, kept: dict[int, int], memo: dict[int, int]) -> Shape:
        """Predicted shape of a value when each group ``g`` keeps ``kept[g]`` channels."""

    def iter_groups(self) -> Iterator[Any]:
        """Prunable groups in a stable order."""


@dataclasses.dataclass
class CostModel:
    """Parameters and FLOPs of one analysed graph under any plan ``kept`` (group id -> channels kept).

    Attributes:
        info: The dependency analysis.
        fixed_params: Parameters outside the tracked weights (no plan changes them).
        weights: The tracked weights' analysis keys, each tensor once (a tied weight is counted once).
        terms: The FLOP terms: each node with its rule's FLOP function.
        key_of: The analysis key of a dialect value, or None.
        static: The shape of a value the analysis does not track, or None (ATen: None; ONNX: its static shape).

    """

    info: Analysis
    fixed_params: int
    weights: tuple[Key, ...]
    terms: Sequence[tuple[Any, FlopFn]]
    key_of: Callable[[Any], Key | None]
    static: Callable[[Any], Shape | None] = lambda value: None

    def params(self, kept: dict[int, int]) -> int:
        """Parameter elements under ``kept``."""
        memo: dict[int, int] = {}
        return self.fixed_params + sum(math.prod(self.info.shape_under(k, kept, memo)) for k in self.weights)

    def flops(self, kept: dict[int, int]) -> float:
        """FLOPs of one call at the analysis shapes under ``kept``."""
        memo: dict[int, int] = {}
        values = self.info.values

        def shape_of(value: Any) -> Shape | None:
            key = self.key_of(value)
            if key is not None and key in values:
                return self.info.shape_under(key, kept, memo)
            return self.static(value)

        return float(sum(fn(node, shape_of) for node, fn in self.terms))

    def predict(self, kept: dict[int, int]) -> tuple[int, float]:
        """(parameters, FLOPs) under ``kept``."""
        return self.params(kept), self.flops(kept)

    def per_channel(self) -> dict[int, tuple[int, float]]:
        """Parameters and FLOPs saved by removing one channel from each prunable group (alone)."""
        params0, flops0 = self.predict({})
        out: dict[int, tuple[int, float]] = {}
        for g in self.info.iter_groups():
            p, f = self.predict({g.id: g.size - 1})
            out[g.id] = (params0 - p, flops0 - f)
        return out
