"""``prune_onnx``: prune an ``.onnx`` file directly, with the same options as :func:`secateurs.prune`.

The pipeline is: load and propagate static shapes (:func:`~secateurs.frontends.onnx_model.load_onnx`),
analyse channel groups with the ONNX op rule table, score them by weight magnitude, choose the channels to
keep with the selection of the PyTorch path, rewrite the graph, and write it atomically after
``onnx.checker`` (full check) and one ONNX Runtime run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from secateurs.api import budget_pass, change_lines, frozen_lines
from secateurs.backends.files import guard_source
from secateurs.backends.onnx_file import run_onnx_model, save_onnx
from secateurs.backends.onnx_masked import cut_expect, masked_model
from secateurs.errors import CheckpointError
from secateurs.frontends.onnx_model import load_onnx
from secateurs.ir.depgraph import DependencyInfo, FrozenGroup
from secateurs.ir.onnx_depgraph import OnnxDependencyInfo, onnx_costs
from secateurs.ir.onnx_graph import OnnxGraph
from secateurs.passes.allocate import LayerBudget
from secateurs.passes.base import PassManager
from secateurs.passes.channels import ChannelOptions, GroupChange
from secateurs.passes.dependencies import DependencyRecord
from secateurs.passes.onnx_channels import OnnxPruneRecord, PruneOnnxChannels
from secateurs.passes.onnx_dependencies import AnalyzeOnnxDependencies
from secateurs.passes.onnx_importance import ScoreOnnxChannels
from secateurs.spec import PruneSpec

__all__ = ["OnnxReport", "inspect_onnx", "prune_onnx"]


log = logging.getLogger(__name__)


@dataclasses.dataclass
class OnnxReport:
    """What :func:`prune_onnx` did.

    Attributes:
        src: The file read.
        dst: The file written (None for a dry run).
        params_before: Weight elements before (floating-point initializers that are not statistics).
        params_after: The same after.
        flops_before: FLOPs of one call at ``shapes`` (Conv, MatMul, Gemm), before.
        flops_after: The same after.
        changes: Every pruned group with its size before and after.
        frozen: Channel groups left alone, each with the reason.
        unsupported_ops: Nodes whose op has no rule (their channels are frozen).
        shapes: The static input shapes the analysis used (symbolic dims given a size).
        seconds: Wall time of loading + analysis + pruning, and of writing + checking.
        latency_before: With ``speedup``: median seconds of one run in ONNX Runtime before (analysis shapes).
        latency_after: The same after pruning.

    """

    src: Path
    dst: Path | None
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    changes: list[GroupChange]
    frozen: list[FrozenGroup]
    unsupported_ops: list[str]
    shapes: dict[str, tuple[int, ...]]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_before: float | None = None
    latency_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        data = dataclasses.asdict(self)
        data.update(src=str(self.src), dst=str(self.dst) if self.dst is not None else None)
        return data

    @property
    def param_ratio(self) -> float:
        """Fraction of parameters removed."""
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_ratio(self) -> float:
        """Fraction of FLOPs removed."""
        return 1 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def __str__(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"{self.src} -> {self.dst}",
            f"params {self.params_before:,} -> {self.params_after:,} (-{100 * self.param_ratio:.1f}%)",
            f"FLOPs  {self.flops_before:,.0f} -> {self.flops_after:,.0f} (-{100 * self.flop_ratio:.1f}%) at "
            + ", ".join(f"{k}{list(v)}" for k, v in self.shapes.items()),
            f"pruned groups: {len(self.changes)}",
        ]
        if self.latency_before and self.latency_after:
            lines.insert(3, f"latency {1e3 * self.latency_before:.2f} ms -> {1e3 * self.latency_after:.2f} ms "
                            f"({self.latency_before / self.latency_after:.2f}x, ONNX Runtime CPU)")
        lines += change_lines(self.changes) + frozen_lines(self.frozen, self.unsupported_ops)
        return "\n".join(lines)


def prune_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    ratio: float | None = None,
    *,
    heads: float | None = None,
    kv_groups: float | None = None,
    ffn: float | None = None,
    channels: float | None = None,
    hidden: bool | float | None = None,
    importance: str | Callable[..., Any] | None = None,
    scope: str | None = None,
    target: str | None = None,
    min_keep: float | None = None,
    round_to: int | None = None,
    tensor_parallel: int | None = None,
    uniform: bool | None = None,
    ignore: Sequence[str] | None = None,
    allocate: str | None = None,
    budget_unit: str | None = None,
    speedup: float | None = None,
    latency_cache: str | None = None,
    latency_backend: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify: bool = True,
) -> OnnxReport:
    """Prune the ONNX file ``src`` and write the result to ``dst``.

    Args:
        src: The ``.onnx`` file (opset >= 13, or convertible to it).
        dst: Where to write the pruned model (atomically; never ``src`` itself); None plans and reports only.
        ratio: Fraction of every group's channels to remove, in [0, 1). Defaults to 0.3 when no per-structure
            ratio is given, else to 0 (only the named structures are pruned).
        heads: Fraction of attention heads to remove (query heads within each KV group under GQA).
        kv_groups: Fraction of KV groups (a KV head with its query heads) to remove.
        ffn: Fraction of MLP / GLU neurons to remove.
        channels: Fraction of other channels (convolutions) to remove.
        hidden: Also prune channels that enter a normalisation (a transformer's hidden size): ``True`` uses
            ``ratio``, a float is its own ratio.
        importance: A weight criterion (``"l1"``, ``"l2"`` (the default), ``"maw"``, ``"random"``: see
            :mod:`secateurs.passes.criteria`) or a callable ``(graph, info, group) -> scores``.
        scope: ``"local"`` (same fraction per group) or ``"global"`` (one normalised ranking per kind).
        target: What ``ratio`` is a fraction of: ``"channels"`` (of every group), ``"params"`` (of the weights)
            or ``"flops"`` (of one call at the analysis shapes), costed on the ONNX graph itself.
        min_keep: Per-group floor as a fraction of its channels (default 0.1).
        round_to: Keep every sliced dim a multiple of this (default 8, as :func:`secateurs.prune`; 1 disables).
        tensor_parallel: Keep every pruned size shardable over this many ranks (as :func:`secateurs.prune`).
        uniform: Equalise an allocator's per-layer ratios per structure (as :func:`secateurs.prune`).
        ignore: Names (or prefixes ending in ``.``) of the modules / initializers whose groups stay whole.
        allocate: Spread the budget over the groups with an allocator (``"global"``, ``"lamp"``, ``"owl"``,
            ``"dp"``), as :func:`secateurs.prune` does, costed on the ONNX graph.
        budget_unit: What the allocator's budget counts: ``"channels"``, ``"params"``, ``"flops"`` or
            ``"latency"`` (each MatMul / Gemm / Conv timed alone in ONNX Runtime at the analysis shapes).
        speedup: A whole-model latency target (1.5 for 1.5x faster in ONNX Runtime); implies the ``dp``
            allocator and ``budget_unit="latency"``; the report gives the latency measured before and after.
        latency_cache: Latency cache file (default ``~/.cache/secateurs/latency.json``).
        latency_backend: ``"onnxruntime"`` (the only one for a file).
        input_shapes: Static shapes for inputs with symbolic dims, for the analysis (see
            :func:`~secateurs.frontends.onnx_model.load_onnx`).
        verify: Run the written model once in ONNX Runtime before moving it into place.

    Returns:
        The report.

    Raises:
        CheckpointError: ``src`` is missing or malformed, or ``dst`` cannot be written.
        CaptureError: The opset is too old to convert, or no static shapes could be found.
        BudgetError: An option is invalid.
        VerificationError: The rewritten model fails the checks (nothing is written).

    """
    spec = PruneSpec.parse({"ratio": ratio, "heads": heads, "kv_groups": kv_groups, "ffn": ffn, "channels": channels,
                            "hidden": hidden, "importance": importance, "scope": scope, "target": target,
                            "min_keep": min_keep, "round_to": round_to, "tensor_parallel": tensor_parallel, "uniform": uniform,
                            "ignore": ignore, "allocate": allocate,
                            "budget_unit": budget_unit, "speedup": speedup, "latency_cache": latency_cache,
                            "latency_backend": latency_backend},
                           path="onnx", where="prune_onnx()").resolved(calibrated=False, path="onnx")
    options = ChannelOptions(ratio=spec.default_ratio, scope=spec.scope or "local", target=spec.target or "channels",
                             min_keep=0.1 if spec.min_keep is None else spec.min_keep,
                             round_to=8 if spec.round_to is None else spec.round_to, ignore=tuple(spec.ignore or ()),
                             hidden=spec.hidden is True, kind_ratios=spec.kind_ratios, verify=False,
                             tensor_parallel=spec.tensor_parallel or 1, uniform=bool(spec.uniform))
    scorer = ScoreOnnxChannels(spec.importance or "l2")  # resolved: never None
    pruner = PruneOnnxChannels(options)
    budget, table = budget_pass(spec, options.min_keep, backend="onnxruntime")
    start = time.perf_counter()
    if dst is not None:
        guard_source(src, dst, "the output")
    graph = load_onnx(src, input_shapes=input_shapes)
    if verify:
        _refuse_custom_ops(graph)
    params_before = graph.param_count()
    shapes = {v.name: graph.shapes[v.name] for v in graph.graph.inputs
              if v.name and not v.is_initializer() and v.name in graph.shapes}
    small = verify and dst is not None and _bytes(graph) < 1_800_000_000
    dense = ir.serde.deserialize_model(ir.serde.serialize_model(graph.model)) if small else None
    pipeline = PassManager([AnalyzeOnnxDependencies(), scorer, *([budget] if budget else []), pruner])(graph)
    results = pipeline.results
    allocated = pipeline.record(LayerBudget)  # with speedup, the dense file's latency the budget was derived from
    latency_before = allocated.model_latency if allocated is not None else None
    deps = results[0][1].record
    record = results[-1][1].record
    assert isinstance(deps, DependencyRecord) and isinstance(record, OnnxPruneRecord)
    analysed = time.perf_counter()
    expect = None
    if dense is not None and record.masks:
        # the plan's meaning: the dense file with every removed channel of every initializer zeroed, and the
        # statistics over a pruned hidden size taken from the pruned run (secateurs.backends.onnx_masked)
        masked = masked_model(dense, record.masks)
        if not record.cuts:
            expect = run_onnx_model(masked, shapes)
        else:
            expect, why = cut_expect(masked, results[-1][1].graph.model, record.cuts, shapes)
            if why is not None:
                log.warning("the masked-model check does not run on this pruning of a hidden size: %s", why)
    latency_after = None
    if table is not None:
        table.save()
        if latency_before is not None:
            latency_after = table.model_latency(results[-1][1].graph)
    out = save_onnx(results[-1][1].graph, dst, run_inputs=shapes if verify else None,
                    expect=expect) if dst is not None else None
    return OnnxReport(
        src=Path(src), dst=out,
        params_before=params_before, params_after=graph.param_count(),
        flops_before=record.flops_before, flops_after=record.flops_after,
        changes=record.changes, frozen=record.frozen, unsupported_ops=list(deps.unsupported_ops), shapes=shapes,
        seconds={"analyse_and_prune": analysed - start, "write_and_check": time.perf_counter() - analysed},
        latency_before=latency_before, latency_after=latency_after,
    )


def _bytes(graph: OnnxGraph) -> int:
    return sum(int(v.const_value.nbytes) for v in graph.graph.initializers.values() if v.const_value is not None)


ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
               "com.ms.internal.nhwc")
"""Operator domains ONNX Runtime has kernels for (standard ONNX and its own contrib ops)."""


def _refuse_custom_ops(graph: OnnxGraph) -> None:
    """Refuse a file whose ops ONNX Runtime cannot run: the rewrite could not be verified (bad input, exit 2).

    Raises:
        CheckpointError: A node of a custom domain that is neither ONNX Runtime's nor a function of the model.

    """
    functions = {(f.domain, f.name) for f in graph.model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.domain not in ORT_DOMAINS and (node.domain, node.op_type) not in functions:
            where = f"node '{node.name}'" if node.name else "an unnamed node"
            raise CheckpointError(
                f"'{graph.path}': {where} is the custom op {node.domain}::{node.op_type}, which ONNX "
                "Runtime has no kernel for; every rewrite is verified by running it in ONNX Runtime, so this file "
                "cannot be pruned (register the op's kernel library in ONNX Runtime, or export without custom ops)")


def inspect_onnx(src: str | os.PathLike[str], *, input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> dict[str, Any]:
    """The dependency groups of an ONNX file, each frozen group's reason, and weight elements per layer.

    Layers group initializers as :func:`secateurs.report.layer_of` names them.

    Raises:
        CheckpointError: ``src`` is missing or malformed.
        CaptureError: The opset is too old to convert, or no static shapes could be found.

    """
    from secateurs.report import layer_of

    graph = load_onnx(src, input_shapes=input_shapes)
    results = PassManager([AnalyzeOnnxDependencies()])(graph).results
    graph = results[0][1].graph
    info = graph.analysis(DependencyInfo)
    assert isinstance(info, OnnxDependencyInfo)
    deps = results[0][1].record
    assert isinstance(deps, DependencyRecord)
    layers: dict[str, int] = {}
    for value in graph.graph.initializers.values():
        if value.name and graph.is_weight(value):
            layers[layer_of(value.name)] = layers.get(layer_of(value.name), 0) + int(graph.array(value.name).size)
    return {
        "params": graph.param_count(),
        "flops": onnx_costs(graph, info).flops({}),
        "groups": [{"name": g.name, "kind": g.kind, "size": g.size, "params_per_channel": g.params_per_channel}
                   for g in info.iter_groups()],
        "frozen": [{"members": list(f.members), "size": f.size, "reason": f.reason} for f in info.frozen],
        "unsupported_ops": list(deps.unsupported_ops),
        "layers": [{"name": k, "params": v, "flops": 0.0} for k, v in layers.items()],
    }
