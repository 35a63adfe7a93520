"""PruneOnnxChannels: width pruning of an ONNX graph, rewriting initializers and the literals that hold sizes.

The channels to keep are chosen by :func:`secateurs.passes.channel_plan.plan_keep`, the same selection the
PyTorch path uses (per-kind ratios, ``round_to``, ``min_keep``, ``scope``), from the same
:class:`~secateurs.passes.importance.ChannelScores`. The rewrite slices every initializer member, replaces
the literals recorded by the op rules (Reshape targets, Expand shapes, Split sizes, Slice bounds, Conv
``group``), updates the static dims of value shapes (symbolic dims stay symbolic), removes what became
unused, and then propagates shapes again and checks every value against the plan.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from secateurs.errors import BudgetError, PassContractError, VerificationError
from secateurs.frontends.onnx_model import propagate_shapes
from secateurs.ir.depgraph import DependencyInfo, FrozenGroup, require_kinds
from secateurs.ir.onnx_depgraph import Cut, OnnxDependencyInfo
from secateurs.ir.onnx_graph import OnnxGraph
from secateurs.passes.allocate import LayerBudget
from secateurs.passes.base import cost_model
from secateurs.passes.channels import ChannelOptions, GroupChange, left_alone, plan_keep, require_removal
from secateurs.passes.importance import ChannelScores
from secateurs.passes.onnx_base import OnnxPass, OnnxPassResult

__all__ = ["OnnxPruneRecord", "PruneOnnxChannels"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OnnxPruneRecord:
    """What :class:`PruneOnnxChannels` did.

    Attributes:
        options: The options it ran with.
        changes: Every pruned group with its size before and after.
        frozen: Groups left alone, with the reason.
        params_before: Weight elements before.
        params_after: Weight elements after.
        flops_before: FLOPs of one call at the analysis shapes, before.
        flops_after: The same after.
        masks: Initializer name -> per-dim keep masks of every initializer that lost channels (for the
            masked-model check: the dense file with those entries zeroed computes what the pruned one must).
        mixed: Whether a pruned group enters a normalisation (then no masked dense model computes the same).
        cuts: The nodes whose statistics run over a pruned axis, with the keep masks of their inputs and
            outputs (the masked-model check takes those statistics from the pruned run).

    """

    options: ChannelOptions
    changes: list[GroupChange]
    frozen: list[FrozenGroup]
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    masks: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)
    mixed: bool = False
    cuts: list[Cut] = dataclasses.field(default_factory=list, repr=False)


class PruneOnnxChannels(OnnxPass):
    """Transform pass: remove the least important channels of every group and rewrite the ONNX graph.

    Requires :class:`DependencyInfo` (from :class:`AnalyzeOnnxDependencies`) and :class:`ChannelScores`; follows
    a :class:`LayerBudget` when an allocator (:class:`~secateurs.passes.allocate.AllocateBudget`, the same pass as
    in memory) wrote one.
    Guarantees: graph inputs and outputs keep their shapes, and every value's static shape after the rewrite
    equals the plan's prediction (checked by propagating shapes again).
    """

    requires = (DependencyInfo, ChannelScores)
    transforms = True

    def __init__(self, options: ChannelOptions | None = None, **kwargs: object) -> None:
        """Create the pass from a :class:`ChannelOptions` or its fields as keywords.

        Raises:
            BudgetError: Both forms were given, or an option needs the PyTorch model (bias compensation).

        """
        if options is not None and kwargs:
            raise BudgetError("pass either options or keyword options, not both")
        self.options = options or ChannelOptions(**kwargs)  # type: ignore[arg-type]
        if self.options.bias_compensation:
            raise BudgetError("bias compensation needs calibration statistics, which an ONNX file does not have")

    def run(self, graph: OnnxGraph) -> OnnxPassResult:
        """Plan and rewrite ``graph`` in place."""
        info = graph.analysis(DependencyInfo)
        if not isinstance(info, OnnxDependencyInfo):
            raise PassContractError("PruneOnnxChannels needs the dependency analysis of an ONNX graph")
        scores = graph.analysis(ChannelScores).scores
        opts = self.options
        frozen = [*info.frozen, *left_alone(info, opts)]
        costs = cost_model(graph, info)
        params_before, flops_before = costs.predict({})
        budget = graph.analyses.get(LayerBudget)  # an allocator's per-group ratios, as in memory
        per_group = budget.ratios if budget is not None else None
        if per_group is None and opts.require:  # a structure that selects or removes nothing is refused
            require_kinds(info, opts.kind_ratios)
        bounds: dict[int, str] = {}
        keep = plan_keep(graph, info, scores, opts, per_group=per_group, cost=costs.predict, bounds=bounds)
        if per_group is None and opts.require:
            require_removal(info, opts, keep, set(), frozen)
        if not keep:
            record = OnnxPruneRecord(opts, [], frozen, params_before, params_before, flops_before, flops_before)
            return OnnxPassResult(graph, False, record)
        kept = {g: int(m.sum()) for g, m in keep.items()}
        params_after, flops_after = costs.predict(kept)
        inputs = {v.name: graph.shapes[v.name] for v in graph.graph.inputs
                  if v.name and not v.is_initializer() and v.name in graph.shapes}
        masks: dict[str, list[np.ndarray]] = {}
        for name in graph.graph.initializers:
            per_dim = [info.table.keep_mask(a, keep) for a in info.values.get((name, -1), [])]
            if not all(m.all() for m in per_dim):
                masks[name] = per_dim
        cuts = _cuts(graph, info, keep)
        _Rewriter(graph, info, keep).apply()
        propagate_shapes(graph, input_shapes=inputs)
        _check(graph, info, kept)
        changes = [GroupChange(info.groups[g].name, info.groups[g].size, k, info.groups[g].kind,
                               bounds.get(g, ""))
                   for g, k in sorted(kept.items())]
        record = OnnxPruneRecord(opts, changes, frozen, params_before, params_after, flops_before, flops_after,
                                 masks, any(info.groups[g].mixed_at is not None for g in keep), cuts)
        return OnnxPassResult(graph, True, record)


def _cuts(graph: OnnxGraph, info: OnnxDependencyInfo, keep: dict[int, np.ndarray]) -> list[Cut]:
    """Every node where pruned channels enter a cross-channel statistic, with its values' keep masks."""
    pruned = [name for name, atoms in info.mixing.items() if any(not info.table.keep_mask(a, keep).all()
                                                                  for a in atoms)]
    nodes = {node.name: node for node in graph.graph if node.name}
    cuts = []
    for name in pruned:
        node = nodes.get(name)
        names = [] if node is None else [v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name]
        masks = {n: [info.table.keep_mask(a, keep) for a in info.values[(n, -1)]]
                 for n in names if (n, -1) in info.values}
        cuts.append(Cut(name, masks))  # a name outside the main graph is reported by the check
    return cuts


def _check(graph: OnnxGraph, info: OnnxDependencyInfo, kept: dict[int, int]) -> None:
    """Compare every value's propagated static shape with the plan.

    Raises:
        VerificationError: A value's shape differs from the prediction (the message names it).

    """
    memo: dict[int, int] = {}
    for (name, _), _atoms in info.values.items():
        got = graph.shapes.get(name)
        if got is None or graph.value(name) is None:
            continue
        want = info.shape_under((name, -1), kept, memo)
        if got != want:
            raise VerificationError(
                f"after pruning, '{name}' has shape {got} but the plan predicts {want}; the ONNX graph holds a "
                "size the op rules did not see (nothing was written)"
            )


class _Rewriter:
    """Applies keep masks to an ONNX graph in place."""

    def __init__(self, graph: OnnxGraph, info: OnnxDependencyInfo, keep: dict[int, np.ndarray]) -> None:
        self.graph = graph
        self.info = info
        self.keep = keep
        self.kept = {g: int(m.sum()) for g, m in keep.items()}
        self.memo: dict[int, int] = {}
        self.masks: dict[int, np.ndarray] = {}
        self.names = {v.name for v in graph.graph.inputs} | set(graph.graph.initializers)
        self.names |= {o.name for node in graph.graph.all_nodes() for o in node.outputs if o.name}

    def apply(self) -> None:
        self._initializers()
        self._value_shapes()
        self._shape_inputs()
        self._slice_bounds()
        self._attributes()
        ir_passes.RemoveUnusedNodesPass()(self.graph.model)

    # ----------------------------------------------------------------- helpers
    def _mask(self, atom: int) -> np.ndarray:
        root = self.info.table.find(atom)
        mask = self.masks.get(root)
        if mask is None:
            mask = self.masks[root] = self.info.table.keep_mask(atom, self.keep)
        return mask

    def _size(self, atom: int) -> int:
        return self.info.table.sized(atom, self.kept, self.memo)

    def _fresh(self, base: str) -> str:
        name = base
        k = 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def _constant(self, base: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=self._fresh(base), shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
        self.graph.graph.register_initializer(value)
        return value

    def _node_label(self, node: ir.Node) -> str:
        return node.name or node.op_type

    def _replace_vector(self, node: ir.Node, index: int, new: np.ndarray) -> None:
        """Feed ``new`` to input ``index`` of ``node``.

        As a constant when every element is a literal, else as the old vector plus a constant delta (elements
        read from sizes keep following them).
        """
        vec = node.inputs[index] if index < len(node.inputs) else None
        label = self._node_label(node)
        if vec is None:
            node.resize_inputs(max(len(node.inputs), index + 1))
            node.replace_input_with(index, self._constant(f"{label}_input{index}", new))
            return
        old = self.graph.const(vec)
        assert old is not None
        new = new.astype(old.dtype).reshape(old.shape)
        origins = self.graph.origins.get(vec.name or "", ())
        if all(o is None for o in origins):
            node.replace_input_with(index, self._constant(f"{label}_input{index}", new))
            return
        delta = self._constant(f"{label}_input{index}_delta", (new - old).astype(old.dtype))
        out = ir.Value(name=self._fresh(f"{label}_input{index}"), shape=ir.Shape(old.shape),
                       type=ir.TensorType(ir.DataType.from_numpy(old.dtype)))
        add = ir.Node("", "Add", [vec, delta], outputs=[out], name=self._fresh(f"{label}_input{index}_add"))
        self.graph.graph.insert_before(node, add)
        node.replace_input_with(index, out)

    # ------------------------------------------------------------------ passes
    def _initializers(self) -> None:
        for name, value in list(self.graph.graph.initializers.items()):
            atoms = self.info.values.get((name, -1))
            tensor = value.const_value
            if atoms is None or tensor is None:
                continue
            masks = [self._mask(a) for a in atoms]
            if all(m.all() for m in masks):
                continue
            array = tensor.numpy()
            for d, m in enumerate(masks):
                if not m.all():
                    array = np.compress(m, array, axis=d)
            value.const_value = ir.tensor(np.ascontiguousarray(array), dtype=tensor.dtype, name=name)
            value.shape = ir.Shape(array.shape)

    def _value_shapes(self) -> None:
        g = self.graph.graph
        values = [*g.inputs, *g.outputs, *(o for node in g for o in node.outputs)]
        for value in values:
            if value.shape is None or not value.name or value.is_initializer():
                continue
            atoms = self.info.values.get((value.name, -1))
            if atoms is None or len(atoms) != len(value.shape):
                continue
            dims = list(value.shape)
            changed = False
            for i, (d, atom) in enumerate(zip(dims, atoms, strict=True)):
                new = self._size(atom)
                if isinstance(d, int) and d != new:
                    dims[i] = new
                    changed = True
            if changed:
                value.shape = ir.Shape(dims)

    def _shape_inputs(self) -> None:
        for rec in self.info.shape_inputs:
            node = rec.node
            vec = node.inputs[rec.index] if rec.index < len(node.inputs) else None
            old = self.graph.const(vec)
            if old is None:
                if node.op_type != "Split":
                    continue
                old = np.array([self.info.table.size(a) if a is not None else 0 for a in rec.atoms], dtype=np.int64)
            flat = np.asarray(old).reshape(-1).copy()
            changed = False
            for j, atom in enumerate(rec.atoms):
                if atom is None:
                    continue
                new = self._size(atom)
                if new != self.info.table.size(atom):
                    flat[j] = new
                    changed = True
            if not changed:
                continue
            if vec is None:
                node.attributes.pop("num_outputs", None)
            self._replace_vector(node, rec.index, flat)

    def _slice_bounds(self) -> None:
        updates: dict[tuple[ir.Node, int], dict[int, int]] = {}
        for rec in self.info.slice_bounds:
            mask = self._mask(rec.atom)
            n, new_n = len(mask), int(mask.sum())
            if new_n == n:
                continue
            p = min(max(rec.raw + n if rec.raw < 0 else rec.raw, 0), n)
            new_p = int(mask[:p].sum())
            raw = new_p - new_n if rec.raw < 0 else new_p
            if raw != rec.raw:
                updates.setdefault((rec.node, rec.index), {})[rec.element] = raw
        for (node, index), elements in updates.items():
            old = self.graph.const(node.inputs[index])
            assert old is not None
            flat = np.asarray(old).reshape(-1).copy()
            for k, raw in elements.items():
                flat[k] = raw
            self._replace_vector(node, index, flat)

    def _attributes(self) -> None:
        for rec in self.info.attr_sizes:
            new = self._size(rec.atom)
            if new != self.info.table.size(rec.atom):
                rec.node.attributes[rec.name] = ir.AttrInt64(rec.name, new)
