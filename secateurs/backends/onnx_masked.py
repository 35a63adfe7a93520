"""The masked-model check of a pruned ONNX file: the dense file with the removed channels zeroed must agree.

Without a pruned hidden size, the dense file with every removed channel of every initializer zeroed computes what
the pruned file must, so one ONNX Runtime run of each is compared output by output (:func:`masked_model`).

When the hidden size is pruned, the statistics of every normalisation (and every other cross-channel reduction,
such as a ``ReduceMean`` of a hand-written RMSNorm) over it change by design: a mean over the kept channels is not
a mean over all of them with zeros. Those are the only values the check lets the pruned file define
(:func:`cut_expect`): the dense run takes the pruned run's statistics, everything else it computes itself.

- A ``LayerNormalization`` / ``RMSNormalization`` / ``SimplifiedLayerNormalization`` over a pruned axis becomes, in
  the dense run, ``normalised * scale (+ bias)`` with the dense (masked) scale and bias, where ``normalised`` is the
  pruned run's same normalisation without its affine part (a side node with a unit scale), expanded with zeros at
  the removed channels; a wrong scale or bias is still seen.
- Any other op whose channels mix over a pruned axis (``ReduceMean`` and the other reductions, ``Softmax``) has
  no parameters: the dense run takes its outputs from the pruned run.
- Every value entering such a node must equal, on the kept channels, the pruned run's (relative norm error 1e-3,
  3e-2 in fp16), and so must the model's outputs: each stretch between normalisations is checked at both ends.

Cost: the pruned file runs once more with the values at the cuts as outputs, and the model is held once more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from secateurs.backends.onnx_file import run_onnx_model
from secateurs.errors import VerificationError
from secateurs.ir.onnx_depgraph import Cut

__all__ = ["cut_expect", "masked_model"]

_NORMS = {("", "LayerNormalization"), ("", "RMSNormalization"), ("", "SimplifiedLayerNormalization"),
          ("com.microsoft", "SimplifiedLayerNormalization")}
_PARAMETER_FREE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                   "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Softmax", "LogSoftmax", "Hardmax"}


def masked_model(model: ir.Model, masks: Mapping[str, Sequence[np.ndarray]]) -> ir.Model:
    """``model`` (a copy of the dense graph) with the removed channels of every initializer set to zero.

    Producers then emit zeros and consumers ignore them, so the result computes what the pruned graph must.
    """
    for name, per_dim in masks.items():
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        array = value.const_value.numpy().copy()
        for d, m in enumerate(per_dim):
            if not m.all():
                np.moveaxis(array, d, 0)[~m] = 0  # a view: writes through to ``array``
        value.const_value = ir.tensor(array, dtype=value.const_value.dtype, name=name)
    return model


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _nodes(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.name: node for node in graph if node.name}


def _supported(model: ir.Model, cuts: Sequence[Cut]) -> str | None:
    """Why the cut check cannot run on ``model`` (None when it can)."""
    names = [node.name for node in model.graph]
    nodes = _nodes(model.graph)
    if len(set(names)) != len(names):
        return "node names are not unique"
    for cut in cuts:
        node = nodes.get(cut.node)
        if node is None:
            return f"the normalisation '{cut.node}' is not in the main graph"
        if (node.domain, node.op_type) in _NORMS:
            scale = node.inputs[1] if len(node.inputs) > 1 else None
            if scale is None or scale.const_value is None:
                return f"the scale of '{cut.node}' is computed, not stored"
        elif node.op_type not in _PARAMETER_FREE or node.domain not in ("", "ai.onnx"):
            return f"'{cut.node}' ({node.op_type}) mixes pruned channels and has no cut rule"
    return None


def _data_inputs(node: ir.Node, cut: Cut) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.name in cut.masks and not v.is_initializer()
            and not v.is_graph_input()]


def _used_outputs(node: ir.Node) -> list[ir.Value]:
    return [o for o in node.outputs if o.name and (o.uses() or o.is_graph_output())]


def _probe_pruned(pruned: ir.Model, cuts: Sequence[Cut]) -> tuple[ir.Model, list[str]]:
    """A copy of the pruned model returning, after its own outputs, every value the check needs."""
    model = _copy(pruned)
    graph, nodes = model.graph, _nodes(model.graph)
    exposed: list[str] = []
    seen = {v.name for v in graph.outputs}

    def expose(value: ir.Value) -> None:
        if value.name not in seen:
            seen.add(value.name)
            graph.outputs.append(value)
        exposed.append(value.name or "")

    for cut in cuts:
        node = nodes[cut.node]
        for v in _data_inputs(node, cut):
            expose(v)
        outs = _used_outputs(node)
        if (node.domain, node.op_type) in _NORMS:
            scale = node.inputs[1]
            assert scale is not None and scale.const_value is not None
            array = scale.const_value.numpy()
            ones = ir.Value(name=f"{cut.node}__unit_scale", const_value=ir.tensor(np.ones_like(array)))
            graph.register_initializer(ones)
            side = ir.Node(node.domain, node.op_type, [node.inputs[0], ones], list(node.attributes.values()),
                           num_outputs=1, version=node.version, name=f"{cut.node}__normalised")
            side.outputs[0].name = f"{cut.node}__normalised"
            graph.append(side)
            expose(side.outputs[0])
            outs = outs[1:] if node.outputs[0] in outs else outs
        for o in outs:
            expose(o)
    return model, exposed


def _expand(array: np.ndarray, masks: Sequence[np.ndarray] | None) -> np.ndarray:
    """The pruned value at the dense size, zeros at the removed channels."""
    if not masks or array.ndim != len(masks) or all(m.all() for m in masks):
        return array
    full = np.zeros(tuple(len(m) for m in masks), dtype=array.dtype)
    full[np.ix_(*[np.flatnonzero(m) for m in masks])] = array
    return full


def _adopt(graph: ir.Graph, value: ir.Value, array: np.ndarray, name: str) -> ir.Value:
    """A new graph input ``name`` holding ``array`` in the dense run, replacing every use of ``value``."""
    new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.inputs.append(new)
    if value is not None:
        ir.convenience.replace_all_uses_with(value, new, replace_graph_outputs=True)
    return new


def _close(want: np.ndarray, got: np.ndarray) -> bool:
    if want.shape != got.shape:
        return False
    if not np.issubdtype(want.dtype, np.floating):
        return bool(np.array_equal(want, got))
    x, y = want.astype(np.float64), got.astype(np.float64)
    err, scale = float(np.linalg.norm(y - x)), float(max(np.linalg.norm(x), np.linalg.norm(y)))
    tol = 3e-2 if want.dtype == np.float16 else 1e-3
    return err <= tol * scale + 1e-6 * np.sqrt(max(x.size, 1))


def cut_expect(dense: ir.Model, pruned: ir.Model, cuts: Sequence[Cut], shapes: Mapping[str, Sequence[int]]
               ) -> tuple[list[np.ndarray] | None, str | None]:
    """The outputs the pruned file must give, with the statistics at ``cuts`` taken from the pruned run.

    Args:
        dense: The dense model with the removed channels zeroed (:func:`masked_model`); it is changed.
        pruned: The pruned model (not changed).
        cuts: Every node whose statistics run over a pruned axis.
        shapes: The static input shapes (the inputs are those of :func:`~secateurs.backends.onnx_file.run_onnx`).

    Returns:
        The expected outputs, or None with the reason the check cannot run on this graph.

    Raises:
        VerificationError: A value entering a cut differs between the runs (named with the node).

    """
    why = _supported(dense, cuts) or _supported(pruned, cuts)
    if why is not None:
        return None, why
    probe, exposed = _probe_pruned(pruned, cuts)
    got = run_onnx_model(probe, shapes)
    n = len(pruned.graph.outputs)
    pos = {v.name: i for i, v in enumerate(probe.graph.outputs)}
    values = {name: got[pos[name]] for name in exposed}
    graph, nodes = dense.graph, _nodes(dense.graph)
    feeds: dict[str, np.ndarray] = {}
    checked: list[tuple[str, str]] = []  # (value, node) entering each cut, in order
    compare = {v.name for v in graph.outputs}
    for cut in cuts:
        node = nodes[cut.node]
        for v in _data_inputs(node, cut):
            checked.append((v.name or "", cut.node))
            if v.name not in compare:
                compare.add(v.name)
                graph.outputs.append(v)
        outs = _used_outputs(node)
        if (node.domain, node.op_type) in _NORMS:
            name = f"{cut.node}__normalised"
            feeds[name] = _expand(values[name], cut.masks.get(node.outputs[0].name or ""))
            normalised = _adopt(graph, None, feeds[name], name)  # type: ignore[arg-type]
            scaled = ir.Node("", "Mul", [normalised, node.inputs[1]], name=f"{cut.node}__scaled")
            last = [scaled]
            if node.op_type == "LayerNormalization" and len(node.inputs) > 2 and node.inputs[2] is not None:
                last.append(ir.Node("", "Add", [scaled.outputs[0], node.inputs[2]], name=f"{cut.node}__shifted"))
            for extra in last:
                extra.outputs[0].name = extra.name
            graph.insert_after(node, last)
            ir.convenience.replace_all_uses_with(node.outputs[0], last[-1].outputs[0], replace_graph_outputs=True)
            outs = [o for o in outs if o is not node.outputs[0]]
        for o in outs:
            name = o.name or ""
            feeds[f"{name}__adopted"] = _expand(values[name], cut.masks.get(name))
            _adopt(graph, o, feeds[f"{name}__adopted"], f"{name}__adopted")
        graph.remove(node, safe=True)
    want = run_onnx_model(dense, shapes, extra=feeds)
    outputs = {v.name: i for i, v in enumerate(graph.outputs)}
    for value, node_name in checked:
        dense_value, pruned_value = want[outputs[value]], values[value]
        kept = dense_value
        masks = next((c.masks.get(value) for c in cuts if value in c.masks), None)
        if masks and dense_value.ndim == len(masks):
            kept = dense_value[np.ix_(*[np.flatnonzero(m) for m in masks])]
        if not _close(kept, pruned_value):
            raise VerificationError(
                f"the value '{value}' entering the normalisation '{node_name}' differs from the dense model's with "
                "the removed channels zeroed: the graph holds something that reads channels the rewrite did not "
                "follow; nothing was written")
    return want[:n], None
