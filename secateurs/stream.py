"""Out-of-core pruning: prune a sharded Hugging Face checkpoint one decoder block at a time.

The model is built on the ``meta`` device (no memory). Its decoder blocks are then walked in order: a block's
weights are read from the safetensors shards (:class:`~secateurs.backends.sharded.ShardedSource`), the block
is captured on its own and goes through the passes :func:`secateurs.prune` runs on the whole model, in the same
order, and goes back to ``meta``:

1. depth (``layers``): whole blocks removed by block influence (``bi``) or the angular distance of a window of
   consecutive blocks (``angular``), scored in a first streaming pass over the dense blocks;
2. experts (``experts``, routing statistics) and the neurons inside experts (``expert_neurons``);
3. width: attention heads, KV groups and FFN neurons (``heads``, ``kv_groups``, ``ffn``), each block by its
   own ranking (``scope="local"``), or by one ranking across all blocks (``scope="global"``) or a budget
   allocator (``allocate``) fed by per-block scores gathered in a first streaming pass; and the hidden size
   (``hidden``): the residual channels are one group across the embeddings, every block, the final norm and
   the LM head (found by capturing the whole model on ``meta``), scored from every block's weights in the
   first pass and sliced from each block, and from the embeddings and LM head in row chunks, while writing;
4. sparsity (unstructured or N:M; magnitude, ``wanda`` or ``sparsegpt`` calibrated block by block).

The last walk writes every block as its own shard. Embeddings, the final norm and the LM head are copied
through in row chunks. The output is a sharded checkpoint with ``model.safetensors.index.json``, the config
and the ``secateurs.json`` manifest, so :func:`secateurs.load_pretrained` loads it (and plain
``from_pretrained`` too when the pruning is uniform); it is written into a temporary folder, checked the way
its loader will load it (:mod:`secateurs.stream_reload`) and renamed into place at the end, so an interrupted
or refused run leaves nothing.

Peak memory is one block's weights plus the calibration activations (:class:`StreamReport` measures both).

Calibrated steps carry the calibration batches' hidden states from block to block, one stream per model state
the in-memory pipeline calibrates on: the dense blocks for depth and expert scores, the blocks after expert
pruning for activation / FLAP width scores, and the fully pruned blocks for ``wanda`` / ``sparsegpt``
(as :func:`secateurs.prune` does with ``sequential=True``). So ``prune_checkpoint(src, dst, **options,
calib=b)`` gives the weights of ``prune(model, **options, calib=b, sequential=True)``.
Under ``torchrun`` each rank carries its share of the batches, statistics are summed over the ranks and rank
0 writes (see :mod:`secateurs.distributed`).

Not streamed (refused with a message): Taylor importance, ``greedy`` depth, sublayers and the ``ecoflap``
allocator (they need the whole model's loss), and the hidden size by calibrated criteria.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.backends.checkpoint import MANIFEST, TOKENIZER_FILES, describe
from secateurs.backends.expert_layout import PerExpertSource, fused_state, per_expert_state, stores_experts_one_by_one
from secateurs.backends.files import guard_source
from secateurs.backends.sharded import ShardedSource, ShardedWriter, shard_name
from secateurs.distributed import all_reduce_sum, barrier, is_writer, presharded, shard, world_size
from secateurs.errors import BudgetError, CheckpointError
from secateurs.frontends.torch_export import capture
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo
from secateurs.ir.graph import Graph
from secateurs.modeling.rewrite import Snapshot, slice_dims
from secateurs.passes.allocate import AllocateBudget, LayerBudget
from secateurs.passes.base import Pass, PassManager, PassResult
from secateurs.passes.channels import ChannelOptions, PruneChannels, PruneRecord, _eligible, _round_keep
from secateurs.passes.dependencies import AnalyzeDependencies
from secateurs.passes.depth import RemoveBlocks, angular_distance, mean_cosine
from secateurs.passes.experts import (
    EXPERT_CRITERIA,
    ExpertChange,
    PruneExpertNeurons,
    PruneExperts,
    ScoreExperts,
    find_moe_blocks,
)
from secateurs.passes.hooks import first_tensor
from secateurs.passes.importance import ChannelScores, ScoreChannels, _per_position, _reduce_positions
from secateurs.passes.sparsity import SparsifyWeights
from secateurs.progress import track
from secateurs.stream_reload import check_streamed_reload, digest

__all__ = ["STREAM_ALLOCATORS", "STREAM_IMPORTANCE", "StreamOptions", "StreamReport", "prune_checkpoint",
           "resolve_defaults"]

log = logging.getLogger(__name__)

STREAM_IMPORTANCE = ("l1", "l2", "maw", "activation", "flap")
STREAM_ALLOCATORS = ("global", "lamp", "owl", "dp", "cfsp")
_CALIBRATED_IMPORTANCE = ("activation", "flap")
_CALIBRATED_SPARSITY = ("wanda", "sparsegpt")
_WIDTH_KINDS = ("heads", "kv_groups", "ffn")

Call = tuple[tuple[Any, ...], dict[str, Any]]


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0):
        raise BudgetError(f"{name} ratio must be in [0, 1), got {value!r}")


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """What :func:`prune_checkpoint` does to the blocks (the names and meanings of :func:`secateurs.prune`).

    Attributes:
        ffn: Fraction of MLP neurons to remove.
        heads: Fraction of attention heads to remove (query heads within each KV group under GQA).
        kv_groups: Fraction of KV groups (a KV head with its query heads) to remove.
        hidden: Fraction of the hidden size (the residual stream, the embeddings' columns) to remove; weight
            criteria only (``l1``, ``l2``, ``maw``), like :func:`secateurs.prune`'s ``hidden=``.
        importance: Width importance: ``l1``, ``l2``, ``maw`` (weights only) or ``activation`` / ``flap``
            (calibrated on the blocks' inputs). Default (None): ``flap`` when :func:`prune_checkpoint` gets
            calibration batches and the hidden size is not pruned, else ``l2`` (as :func:`secateurs.prune`).
        scope: ``local`` (every block loses each ratio) or ``global`` (one ranking per structure across all
            blocks, scores normalised by each group's mean; needs a first streaming pass).
        allocate: Spread each ratio over the blocks with a budget allocator: ``global``, ``lamp``, ``owl``,
            ``dp`` or ``cfsp`` (first streaming pass; see :mod:`secateurs.passes.allocate`).
        budget_unit: What the allocator's ratios count: ``channels`` or ``params``.
        bias_compensation: Fold removed inputs' calibration means into the consumers' biases (FLAP). Default
            (None): on with ``flap``.
        round_to: Keep every width a multiple of this.
        min_keep: Keep at least this fraction of every group.
        experts: Fraction of the experts of every mixture-of-experts block to remove.
        expert_neurons: Fraction of the neurons inside every expert to remove.
        expert_importance: ``frequency``, ``mass`` or ``output_norm`` of the routing on the calibration data.
        layers: Whole blocks to remove: a count >= 1 or a fraction of the blocks.
        depth_criterion: ``bi`` (block influence) or ``angular`` (the window of consecutive blocks that
            changes the stream least).
        sparsity: Unstructured weight sparsity of every linear layer in the blocks.
        nm: N:M sparsity, ``(2, 4)`` or ``"2:4"``.
        sparsity_criterion: ``magnitude``, or ``wanda`` / ``sparsegpt`` (calibrated block by block).
        block: SparseGPT column block size.
        damp: SparseGPT dampening.
        chunk_bytes: Largest piece of a copied-through tensor (embeddings, LM head) held at once.
        max_shard_bytes: Largest output shard of copied-through tensors (each block is one shard).
        expert_layout: How MoE experts are written: ``source`` (as the source stores them; per-expert only when
            plain ``from_pretrained`` can load the pruning), ``fused`` or ``per-expert``.

    """

    ffn: float | None = None
    heads: float | None = None
    kv_groups: float | None = None
    hidden: float | None = None
    importance: str | None = None
    scope: str = "local"
    allocate: str | None = None
    budget_unit: str = "channels"
    bias_compensation: bool | None = None
    round_to: int = 8
    min_keep: float = 0.1
    experts: float | None = None
    expert_neurons: float | None = None
    expert_importance: str = "frequency"
    layers: float | None = None
    depth_criterion: str = "bi"
    sparsity: float | None = None
    nm: tuple[int, int] | str | None = None
    sparsity_criterion: str = "magnitude"
    block: int = 128
    damp: float = 0.01
    chunk_bytes: int = 64 << 20
    max_shard_bytes: int = 4 << 30
    expert_layout: str = "source"

    def __post_init__(self) -> None:
        for name in ("ffn", "heads", "kv_groups", "hidden", "experts", "expert_neurons", "sparsity"):
            _check_fraction(name, getattr(self, name))
        if self.importance is not None and self.importance not in STREAM_IMPORTANCE:
            raise BudgetError(f"importance {self.importance!r} cannot stream block by block; choose from "
                              f"{STREAM_IMPORTANCE} (taylor needs the whole model's loss)")
        if self.sparsity_criterion not in ("magnitude", *_CALIBRATED_SPARSITY):
            raise BudgetError(f"sparsity criterion {self.sparsity_criterion!r} cannot stream block by block; "
                              "choose magnitude, wanda or sparsegpt")
        if self.scope not in ("local", "global"):
            raise BudgetError(f"scope must be 'local' or 'global', got {self.scope!r}")
        if self.allocate is not None and self.allocate not in STREAM_ALLOCATORS:
            raise BudgetError(f"allocator {self.allocate!r} cannot stream block by block; choose from "
                              f"{STREAM_ALLOCATORS} (ecoflap needs the whole model's loss)")
        if self.budget_unit not in ("channels", "params"):
            raise BudgetError(f"a streamed budget counts 'channels' or 'params', not {self.budget_unit!r}")
        if self.expert_importance not in EXPERT_CRITERIA:
            raise BudgetError(f"unknown expert importance {self.expert_importance!r}; choose from {EXPERT_CRITERIA}")
        if self.layers is not None and (not isinstance(self.layers, (int, float)) or not math.isfinite(self.layers)
                                        or self.layers < 0):
            raise BudgetError(f"layers must be a count >= 1 or a fraction in [0, 1), got {self.layers!r}")
        if self.depth_criterion not in ("bi", "angular"):
            raise BudgetError(f"depth criterion {self.depth_criterion!r} cannot stream block by block; choose bi or "
                              "angular (greedy re-runs the whole model for every candidate)")
        if self.hidden and self.importance in _CALIBRATED_IMPORTANCE:
            raise BudgetError(f"the hidden size streams with weight criteria (l1, l2, maw), not {self.importance!r}: "
                              "its activation statistics span every block at once")
        if self.hidden and self.allocate is not None:
            raise BudgetError("the hidden size is one group; do not combine hidden with an allocator when streaming")
        if self.bias_compensation and self.importance not in _CALIBRATED_IMPORTANCE:
            raise BudgetError("bias compensation needs calibration statistics: use importance 'flap' or 'activation'")
        if int(self.round_to) < 1:
            raise BudgetError(f"round_to must be >= 1, got {self.round_to!r}")
        if isinstance(self.nm, str):
            try:
                n, m = (int(v) for v in self.nm.split(":"))
            except ValueError as exc:
                raise BudgetError(f"nm must look like '2:4', got {self.nm!r}") from exc
            object.__setattr__(self, "nm", (n, m))
        if self.expert_layout not in ("source", "fused", "per-expert"):
            raise BudgetError(f"unknown expert layout {self.expert_layout!r}; choose source, fused or per-expert")
        if self.chunk_bytes < 1 or self.max_shard_bytes < 1:
            raise BudgetError("chunk_bytes and max_shard_bytes must be positive")

    @property
    def kind_ratios(self) -> tuple[tuple[str, float], ...]:
        """The width ratios that are asked for, per structure kind."""
        return tuple((k, float(v)) for k in _WIDTH_KINDS if (v := getattr(self, k)))

    @property
    def width(self) -> bool:
        """Whether heads, KV groups or FFN neurons are pruned."""
        return bool(self.kind_ratios)

    @property
    def surveys(self) -> bool:
        """Whether a first pass gathers statistics of every block (coupled width decisions, the hidden size)."""
        return self.surveyed or bool(self.hidden)

    @property
    def surveyed(self) -> bool:
        """Whether width decisions couple the blocks (one ranking or an allocator over all of them)."""
        return self.width and (self.scope == "global" or self.allocate is not None)

    @property
    def sparse(self) -> bool:
        """Whether the blocks are sparsified."""
        return self.sparsity is not None or self.nm is not None

    @property
    def calibrated(self) -> bool:
        """Whether any step needs calibration data."""
        return bool(self.needs_calibration)

    @property
    def needs_calibration(self) -> list[str]:
        """The options that need calibration data, as a user wrote them."""
        out = [f"layers={self.layers}"] if self.layers else []
        out += [f"experts={self.experts}"] if self.experts else []
        if self.width and self.allocate == "cfsp":
            out.append("allocate='cfsp'")
        if self.width and self.importance in _CALIBRATED_IMPORTANCE:
            out.append(f"importance={self.importance!r}")
        if self.sparse and self.sparsity_criterion in _CALIBRATED_SPARSITY:
            out.append(f"sparsity_criterion={self.sparsity_criterion!r}")
        return out

    @property
    def block_capture(self) -> bool:
        """Whether blocks are captured whole (else only the MLP, for weight-scored FFN width alone)."""
        return bool(self.heads or self.kv_groups or self.experts or self.expert_neurons or self.calibrated)


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """What :func:`prune_checkpoint` did and the memory it needed.

    Attributes:
        path: The output folder.
        blocks: How many decoder blocks were written.
        widths: ``(group, width before, width after)`` per pruned head / KV-group / FFN group.
        sparsity: ``(layer, fraction of zero weights)`` per sparsified layer.
        peak_weight_bytes: Most checkpoint tensor bytes loaded at once (one block, or a copied chunk).
        block_bytes: The largest block's weights in bytes.
        model_bytes: All tensors of the source checkpoint in bytes.
        peak_activation_bytes: Most calibration activations alive at once (0 without calibration).
        shards: Output shard files written.
        plain_loadable: Whether plain ``from_pretrained`` loads the output too (False on ranks that do not write).
        seconds: Wall time.
        experts: Per MoE block, experts or neurons per expert before and after.
        removed_blocks: ``(block, score)`` of every removed block (the source's numbering).
        depth_scores: ``(block, score)`` of every candidate block (``bi``) or window start (``angular``).
        passes: How many times the blocks were walked (1, or 2-3 with first statistics passes).
        calibration_batches: The calibration batches this process ran (its share under ``torchrun``).
        expert_layout: For a MoE model, how its experts were written (``written``: fused or per-expert) and why.

    """

    path: Path
    blocks: int
    widths: tuple[tuple[str, int, int], ...]
    sparsity: tuple[tuple[str, float], ...]
    peak_weight_bytes: int
    block_bytes: int
    model_bytes: int
    peak_activation_bytes: int
    shards: int
    plain_loadable: bool
    seconds: float
    experts: tuple[ExpertChange, ...] = ()
    removed_blocks: tuple[tuple[str, float], ...] = ()
    depth_scores: tuple[tuple[str, float], ...] = ()
    passes: int = 1
    calibration_batches: int = 0
    expert_layout: dict[str, str] | None = None

    def summary(self) -> str:
        """A few lines for the console."""
        mib = 1 << 20
        lines = [f"streamed {self.blocks} blocks into {self.path} ({self.shards} shards, {self.passes} "
                 f"pass{'es' if self.passes > 1 else ''} over the weights) in {self.seconds:.1f} s",
                 f"peak weights loaded {self.peak_weight_bytes / mib:.1f} MiB (largest block "
                 f"{self.block_bytes / mib:.1f} MiB, model {self.model_bytes / mib:.1f} MiB); "
                 f"calibration activations {self.peak_activation_bytes / mib:.1f} MiB"]
        if self.removed_blocks:
            lines.append("removed blocks: " + ", ".join(f"{n} ({v:.4f})" for n, v in self.removed_blocks))
        for e in self.experts[:8]:
            lines.append(f"  {e.block}: {e.before} -> {e.after} ({e.what})")
        if self.expert_layout:
            lines.append(f"experts written {self.expert_layout['written']} ({self.expert_layout['why']})")
        if self.widths:
            before, after = sum(w[1] for w in self.widths), sum(w[2] for w in self.widths)
            lines.append(f"width {before} -> {after} over {len(self.widths)} groups (heads, KV groups, FFN neurons, "
                         "hidden size)")
        if self.sparsity:
            lines.append(f"mean sparsity {sum(s for _, s in self.sparsity) / len(self.sparsity):.1%} "
                         f"over {len(self.sparsity)} layers")
        return "\n".join(lines)


class _Stop(Exception):  # noqa: N818 - control flow only
    pass


def _meta_model(folder: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig

    from secateurs.backends.checkpoint import _skeleton

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # a malformed config raises ValueError, TypeError, validation errors, ...
        raise CheckpointError(f"'{folder / 'config.json'}' could not be read: {exc}") from exc
    if not (getattr(config, "architectures", None) or [None])[0]:
        raise CheckpointError(f"'{folder / 'config.json'}' names no architecture ('architectures'); it cannot be "
                              "streamed")
    return _skeleton(config, None, meta=True), config


def _block_list(model: nn.Module, config: Any) -> str:
    """The name of the decoder block list (``model.layers``)."""
    count = getattr(config, "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) and
             (count is None or len(m) == count)]
    if not lists:
        raise BudgetError(f"{type(model).__name__} has no list of {count} decoder blocks to stream")
    return max(lists, key=lambda t: len(t[1]))[0]


def _batches(calib: Iterable[Any]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, batch in enumerate(calib):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        elif isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], torch.Tensor):
            batch = {"input_ids": batch[0]}
        elif isinstance(batch, (tuple, list)):
            raise BudgetError(f"calibration batch {i} is a tuple of {len(batch)}; give a dict with input_ids (and "
                              "attention_mask), so no tensor is dropped")
        if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
            raise BudgetError(f"calibration batch {i} has no input_ids tensor; streaming needs token ids")
        ids = batch["input_ids"]
        out.append({**batch, "input_ids": ids.unsqueeze(0) if ids.dim() == 1 else ids})
    if not out:
        raise BudgetError("calibration data is empty")
    return out


def _materialize_outside(model: nn.Module, blocks: str) -> None:
    """Rebuild the modules outside the blocks whose buffers are not stored (rotary tables) on the CPU."""
    for name, mod in list(model.named_modules()):
        if name == blocks or name.startswith(blocks + "."):
            continue
        if not any(b is not None and b.is_meta for b in mod._buffers.values()):
            continue
        if any(p is not None for p in mod._parameters.values()) or not hasattr(mod, "config"):
            raise CheckpointError(f"module '{name}' ({type(mod).__name__}) has buffers that the checkpoint does "
                                  "not store and that cannot be rebuilt; it cannot be streamed")
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        with torch.device("cpu"):
            owner._modules[leaf] = type(mod)(config=mod.config)


def _first_inputs(model: nn.Module, blocks: str, source: ShardedSource, batches: list[dict[str, torch.Tensor]],
                  dtype: torch.dtype) -> list[Call]:
    """The first block's ``(args, kwargs)`` for every batch.

    Embeddings are looked up row by row in the checkpoint, then the model's own preamble (rotary tables,
    causal mask) runs up to the first block.
    """
    _materialize_outside(model, blocks)
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    emb_name = next((f"{n}.weight" for n, m in model.named_modules() if m is embeddings), None)
    if emb_name is None:
        raise BudgetError(f"{type(model).__name__} has no input embedding to calibrate from")
    base = model.get_submodule(blocks.rpartition(".")[0])
    first = model.get_submodule(f"{blocks}.0")
    calls: list[Call] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                rest = {k: v for k, v in batch.items() if k != "input_ids"}
                embeds = source.rows(emb_name, batch["input_ids"]).to(dtype)
                try:
                    base(inputs_embeds=embeds, use_cache=False, **rest)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise BudgetError(f"{type(base).__name__} did not reach its first block on the calibration inputs")
    return calls


def _bytes(calls: Sequence[Call] | None) -> int:
    if not calls:
        return 0
    return sum(a.numel() * a.element_size() for args, _ in calls for a in args if isinstance(a, torch.Tensor))


def _forward(block: nn.Module, calls: list[Call]) -> tuple[list[Call], list[Any]]:
    """``block``'s outputs as the next block's calls (and an empty list, the form sparsity streams take)."""
    out = []
    with torch.no_grad():
        for args, kwargs in calls:
            hidden = first_tensor(block(*args, **kwargs))
            if hidden is None:
                raise BudgetError(f"{type(block).__name__} returned no tensor; the next block has no input")
            out.append(((hidden.detach(), *args[1:]), kwargs))
    return out, []


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None  # not glibc: its allocator keeps no freed heap to trim


def _release_memory() -> None:
    """Free what a finished block left: its graphs' reference cycles, and glibc's freed heap.

    glibc raises its mmap threshold as large tensors are freed, so the next block's tensors land on the heap,
    which fragments and never shrinks by itself: without the trim, the peak RSS grows by tens of MB per block.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _passthrough_groups(names: list[str], source: ShardedSource, limit: int) -> list[list[str]]:
    groups: list[list[str]] = []
    size = 0
    for n in names:
        nbytes = source.info(n).nbytes
        if not groups or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    return groups


def _as_inputs(block: nn.Module, call: Call) -> dict[str, Any]:
    """A block call as keyword inputs, the form :func:`capture` and the calibration passes take."""
    args, kwargs = call
    sig = inspect.signature(block.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise BudgetError(f"{type(block).__name__} cannot be called with the first block's inputs: {exc}") from exc
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise BudgetError(f"{type(block).__name__}.forward takes *{name}; its inputs cannot be named")
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


@dataclasses.dataclass(frozen=True)
class _Slot:
    """A width group of one block, as the budget allocators see it (``id`` is unique over all blocks)."""

    id: int
    size: int
    kind: str
    name: str
    position: int
    params_per_channel: int


@dataclasses.dataclass
class _HiddenPlan:
    """The hidden-size group of the whole (meta) model, its members and the scores gathered block by block."""

    group: ChannelGroup
    members: list[tuple[str, int, np.ndarray, bool]]  # name, dim, channel of every flat index, is a parameter
    attrs: list[tuple[str, str, int]]  # module, attribute, size it takes once the group keeps ``keep``
    scores: np.ndarray
    table: Any
    keep: np.ndarray | None = None

    def cuts(self, prefix: str) -> tuple[list[tuple[str, int, np.ndarray]], list[tuple[str, str, int]]]:
        """The slices and attributes of the members under ``prefix``, named relative to it."""
        assert self.keep is not None
        cuts = [(name[len(prefix):], dim, np.flatnonzero((pos < 0) | np.isin(pos, self.keep)))
                for name, dim, pos, _ in self.members if name.startswith(prefix)]
        attrs = [(module[len(prefix):], attr, value) for module, attr, value in self.attrs
                 if (module + ".").startswith(prefix)]
        return cuts, attrs


class _GivenBudget(Pass):
    """Analysis pass: the per-group ratios decided from every block's statistics, for this block's groups."""

    requires = (DependencyInfo,)
    provides = (LayerBudget,)

    def __init__(self, ratios: dict[str, float], allocator: str, unit: str) -> None:
        self.ratios, self.allocator, self.unit = ratios, allocator, unit

    def run(self, graph: Graph) -> PassResult:
        info = graph.analysis(DependencyInfo)
        ratios = {g.id: self.ratios.get(g.name, 0.0) for g in info.iter_groups()}
        budget = LayerBudget(self.allocator, 0.0, self.unit, ratios, {g: 1.0 for g in ratios})
        graph.analyses[LayerBudget] = budget
        return PassResult(graph, False, budget)


class _Walker:
    """The meta model, its checkpoint and the calibration streams; walks the blocks one at a time."""

    def __init__(self, folder: Path, opts: StreamOptions, batches: list[dict[str, torch.Tensor]] | None) -> None:
        self.folder, self.opts = folder, opts
        self.source = source = ShardedSource(folder)
        self.model, self.config = _meta_model(folder)
        self.blocks_name = _block_list(self.model, self.config)
        self.blocks = self.model.get_submodule(self.blocks_name)
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.per_expert_source = stores_experts_one_by_one(source.tensors) and any(k not in source for k in expected)
        if self.per_expert_source:  # read through transformers' own conversion into the fused layout
            self.source = source = PerExpertSource(folder, self.model)
        if opts.expert_layout == "per-expert" and not find_moe_blocks(self.model):
            raise BudgetError(f"expert_layout='per-expert': {type(self.model).__name__} has no mixture-of-experts "
                              "layer")
        for name, shape in expected.items():
            if name in source and tuple(source.info(name).shape) != shape:
                hint = ("; the folder was pruned with per-layer sizes (secateurs.json), which streaming cannot "
                        "read: stream the original checkpoint, or prune this one without --stream") \
                    if (folder / MANIFEST).is_file() else ""
                raise CheckpointError(
                    f"'{folder / 'config.json'}' does not match the weights: it makes '{name}' {list(shape)}, the "
                    f"checkpoint stores {list(source.info(name).shape)}{hint}")
        known = set(expected)
        skipped = sorted(n for n in source.tensors if n not in known)
        if skipped:
            log.warning("%d stored tensors are not part of %s and are dropped: %s", len(skipped),
                        type(self.model).__name__, ", ".join(skipped[:5]))
        self.passthrough = [n for n in self.model.state_dict() if n in source and
                            not n.startswith(self.blocks_name + ".")]
        self.keys = [list(b.state_dict()) for b in self.blocks.children()]
        for i, block_keys in enumerate(self.keys):
            missing = [f"{self.blocks_name}.{i}.{k}" for k in block_keys if f"{self.blocks_name}.{i}.{k}" not in source]
            if missing:
                raise CheckpointError(f"the checkpoint in '{folder}' lacks block tensors, e.g. '{missing[0]}'")
        self.block_bytes = max(sum(source.info(f"{self.blocks_name}.{i}.{k}").nbytes for k in ks)
                               for i, ks in enumerate(self.keys))
        self.model_bytes = sum(source.info(n).nbytes for n in source.tensors)
        self.dtype = source.info(f"{self.blocks_name}.0.{self.keys[0][0]}").dtype
        self.order = list(range(len(self.keys)))  # source block of every output position
        self.peak_weights = self.peak_acts = 0
        self.walks = 0
        if (opts.experts or opts.expert_neurons) and not find_moe_blocks(self.model):
            raise BudgetError(f"{type(self.model).__name__} has no mixture-of-experts block; experts / "
                              "expert_neurons cannot apply")
        self.first: list[Call] = []
        if opts.calibrated:
            if batches is None:
                raise BudgetError(f"{', '.join(opts.needs_calibration)} need{'s' if len(opts.needs_calibration) == 1 else ''}"
                                  " calibration batches (calib=...)")
            types = getattr(self.config, "layer_types", None)
            if isinstance(types, list) and len(set(types)) > 1:
                raise BudgetError(f"{type(self.model).__name__} mixes attention types {sorted(set(types))}: "
                                  "streamed calibration passes one attention mask to every block, so it cannot "
                                  "calibrate this model; use weight-only criteria or prune it in memory")
            self.first = _first_inputs(self.model, self.blocks_name, source, batches, self.dtype) if batches else []
        self._example: Call | None = None
        self.experts_state = 0 if opts.experts else None
        self.width_state = int(bool(opts.experts)) + int(bool(opts.expert_neurons))
        hidden = (("hidden", float(opts.hidden)),) if opts.hidden else ()
        self.options = ChannelOptions(ratio=0.0, round_to=opts.round_to, min_keep=opts.min_keep,
                                      kind_ratios=opts.kind_ratios + hidden,
                                      bias_compensation=bool(opts.bias_compensation), require=False)
        self.removed: list[str] = []
        self.hidden: _HiddenPlan | None = None

    def prefix(self, position: int) -> str:
        """The source checkpoint's name prefix of the block at ``position``."""
        return f"{self.blocks_name}.{self.order[position]}."

    def load(self, position: int, block: nn.Module) -> nn.Module:
        """Assign the block's weights from the checkpoint to ``block`` (a meta module of the same structure)."""
        i = self.order[position]
        prefix = self.prefix(position)
        loaded = self.source.load([prefix + k for k in self.keys[i]])
        self.peak_weights = max(self.peak_weights, sum(t.numel() * t.element_size() for t in loaded.values()))
        block.load_state_dict({k: loaded[prefix + k] for k in self.keys[i]}, assign=True, strict=True)
        del loaded
        unset = [n for n, t in (*block.named_parameters(), *block.named_buffers()) if t.is_meta]
        if unset:
            raise CheckpointError(f"block '{prefix[:-1]}' has tensors the checkpoint does not store, e.g. "
                                  f"'{unset[0]}'; it cannot be streamed")
        return block.eval()

    def note_activations(self, streams: dict[Any, list[Call]]) -> None:
        self.peak_acts = max(self.peak_acts, sum(_bytes(c) for c in streams.values()))

    def streams(self) -> dict[Any, list[Call]]:
        """The calibration streams the transform stages read, all starting at the first block's inputs."""
        if not self.first:
            return {}
        opts = self.opts
        out: dict[Any, list[Call]] = {}
        if self.experts_state is not None:
            out[self.experts_state] = self.first
        if opts.width and (opts.importance in _CALIBRATED_IMPORTANCE or opts.allocate == "cfsp"):
            out[self.width_state] = self.first
        if opts.sparse and opts.sparsity_criterion in _CALIBRATED_SPARSITY:
            out["pruned"] = self.first
            if self.hidden is not None and self.hidden.keep is not None:  # the pruned model's embeddings are sliced
                keep = torch.from_numpy(self.hidden.keep)
                out["pruned"] = [((args[0].index_select(-1, keep), *args[1:]), kwargs) for args, kwargs in self.first]
        return out

    def capture_example(self, block: nn.Module, calls: list[Call] | None) -> dict[str, Any]:
        """Keyword inputs to capture ``block`` with: its first calibration call, or one made up of 8 zero tokens."""
        if calls:
            return _as_inputs(block, calls[0])
        return _as_inputs(block, self._base_call())

    def _base_call(self) -> Call:
        if self._example is None:
            self._example = self.first[0] if self.first else _first_inputs(
                self.model, self.blocks_name, self.source, [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}],
                self.dtype)[0]
        return self._example

    def probe_call(self) -> Call | None:
        """The call every written block is probed with for the reload check.

        The first block's inputs, with seeded random hidden states of the output's hidden size; None when the
        model's preamble cannot be rebuilt outside the blocks (then each block's MLP is probed, see
        :meth:`probe`).
        """
        try:
            args, kwargs = self._base_call()
        except CheckpointError:
            return None
        hidden = args[0]
        width = hidden.shape[-1] if self.hidden is None or self.hidden.keep is None else len(self.hidden.keep)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn((*hidden.shape[:-1], width), generator=gen).to(hidden.dtype)
        return (probe, *args[1:]), kwargs

    def probe(self, block: nn.Module, position: int, call: Call | None) -> tuple[str, Call, torch.Tensor]:
        """What the written ``block`` gives on the probe: the whole block on ``call``, or its MLP alone."""
        suffix, target = "", block
        if call is None:
            if self.opts.block_capture:  # unreachable: capturing whole blocks needed the preamble already
                raise BudgetError(f"block '{self.blocks_name}.{position}' cannot be probed for the reload check: "
                                  "the model's preamble cannot be rebuilt")
            target, _, suffix = self.width_target(block, position)  # its MLP, which has a linear layer
            first = next(m for m in target.modules() if isinstance(m, nn.Linear))
            gen = torch.Generator().manual_seed(0)
            call = ((torch.randn((1, 8, first.in_features), generator=gen).to(first.weight.dtype),), {})
        with torch.no_grad():
            said = first_tensor(target(*call[0], **call[1]))
        if said is None:
            raise BudgetError(f"{type(target).__name__} returned no tensor on the probe call")
        return suffix, call, said.detach()

    def width_target(self, block: nn.Module, position: int) -> tuple[nn.Module, Any, str]:
        """What width pruning captures: the whole block, or (FFN width by weights alone) only its MLP.

        The MLP alone needs no inputs from the model's preamble (rotary tables, masks), which some models
        cannot rebuild outside the blocks; its scores and cuts are the same.
        """
        if self.opts.block_capture:
            return block, None, ""
        mlp = getattr(block, "mlp", None)
        first = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None) if isinstance(mlp, nn.Module) else None
        if first is None:
            raise BudgetError(f"block '{self.blocks_name}.{position}' ({type(block).__name__}) has no mlp with a "
                              "linear layer to prune")
        assert isinstance(mlp, nn.Module)
        return mlp, (torch.zeros(1, 1, first.in_features, dtype=first.weight.dtype),), "mlp."

    def depth(self) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """First pass over the dense blocks: choose the blocks to remove, then renumber the meta model."""
        opts, n = self.opts, len(self.keys)
        assert opts.layers is not None
        count = int(round(n * opts.layers)) if opts.layers < 1 else int(opts.layers)
        if count >= n:
            raise BudgetError(f"cannot remove {count} of {n} blocks; at least one must stay")
        if count == 0:
            return [], []
        self.walks += 1
        names = [f"{self.blocks_name}.{i}" for i in range(n)]
        influence: dict[Any, float] = {}
        windows: dict[Any, float] = {}
        boundaries: list[list[torch.Tensor]] = [[args[0] for args, _ in self.first]]
        calls = self.first
        for i in track(range(n), "depth scoring blocks"):
            block = self.load(i, copy.deepcopy(self.blocks.get_submodule(str(i))))
            out, _ = _forward(block, calls)
            influence[i] = float(sum(1 - mean_cosine(a[0], o[0]) for (a, _), (o, _) in zip(calls, out, strict=True)))
            if opts.depth_criterion == "angular":
                boundaries.append([args[0] for args, _ in out])
                start = i + 1 - count
                if start >= 0:
                    windows[start] = float(sum(mean_cosine(x, y) for x, y in zip(
                        boundaries[0], boundaries[-1], strict=True)))
                    boundaries.pop(0)
            calls = out
            self.peak_acts = max(self.peak_acts, _bytes(calls) * (count + 1 if windows or boundaries[1:] else 2))
            del block
            _release_memory()
        total = all_reduce_sum({**{("bi", k): v for k, v in influence.items()},
                                **{("win", k): v for k, v in windows.items()}, "n": float(len(self.first))})
        seen = max(total["n"], 1.0)
        if opts.depth_criterion == "bi":
            scores = {names[i]: total[("bi", i)] / seen for i in range(n)}
            removed = sorted(names, key=lambda c: scores[c])[:count]
            chosen = [(c, scores[c]) for c in removed]
        else:
            scores = {names[s]: angular_distance(total[("win", s)] / seen) for s in range(n - count + 1)}
            best = min(range(n - count + 1), key=lambda s: scores[names[s]])
            chosen = [(names[s], scores[names[best]]) for s in range(best, best + count)]
        drop = {int(c.rpartition(".")[2]) for c, _ in chosen}
        self.removed = [c for c, _ in chosen]
        RemoveBlocks(count)._apply(self.model, self.removed, Snapshot(), [])
        self.order = [i for i in range(n) if i not in drop]
        return sorted(chosen, key=lambda t: int(t[0].rpartition(".")[2])), sorted(scores.items())

    def advance(self, block: nn.Module, streams: dict[Any, list[Call]], state: Any,
                influence: list[float] | None = None) -> list[Call] | None:
        """The calls into ``block`` for ``state``; the stream moves on to the next block's inputs."""
        calls = streams.get(state)
        if calls is None:
            return None
        out, _ = _forward(block, calls)
        if influence is not None:
            influence.append(float(sum(1 - mean_cosine(a[0], o[0]) for (a, _), (o, _) in zip(calls, out, strict=True))))
        streams[state] = out
        return calls

    def transform(self, position: int, block: nn.Module, streams: dict[Any, list[Call]], *,
                  budget: dict[str, float] | None = None, survey: list[Any] | None = None,
                  influence: list[float] | None = None) -> tuple[list[ExpertChange], list[tuple[str, int, int]]]:
        """Experts, expert neurons and width on one loaded block, as :func:`secateurs.prune` orders them.

        With ``survey`` the width scores are appended to it (as ``(slot, scores)``) instead of pruning.
        """
        opts = self.opts
        prefix = f"{self.blocks_name}.{position}."
        graph: Graph | None = None
        experts: list[ExpertChange] = []
        if opts.experts or opts.expert_neurons:
            calls = self.advance(block, streams, self.experts_state) if opts.experts else None
            graph = capture(block, self.capture_example(block, calls))
            passes: list[Pass] = []
            if opts.experts:
                passes += [ScoreExperts(opts.expert_importance, calib=[_as_inputs(block, c) for c in calls or []]),
                           PruneExperts(opts.experts)]
            if opts.expert_neurons:
                passes.append(PruneExpertNeurons(opts.expert_neurons))
            result = PassManager(passes)(graph)
            graph = result.graph
            experts = [dataclasses.replace(c, block=prefix + c.block) for name, r, _ in result.results
                       if name in ("PruneExperts", "PruneExpertNeurons") for c in (r.record or [])]
        if not opts.width:
            return experts, []
        calls = self.advance(block, streams, self.width_state, influence)
        target, example, sub = self.width_target(block, position)
        if graph is None:
            graph = capture(target, example if example is not None else self.capture_example(block, calls))
        calibrated = opts.importance in _CALIBRATED_IMPORTANCE
        result = PassManager([AnalyzeDependencies(), ScoreChannels(
            opts.importance or "l2", calib=[_as_inputs(block, c) for c in calls or []] if calibrated else None)])(graph)
        graph = result.graph
        if survey is not None:
            info = graph.analysis(DependencyInfo)
            scores = graph.analysis(ChannelScores).scores
            ratios = dict(opts.kind_ratios)
            for g in info.iter_groups():
                if ratios.get(g.kind, 0.0) > 0 and _eligible(g, self.options) and (
                        opts.allocate is None or (g.mixed_at is None and g.size > 1)):
                    slot = _Slot(len(survey), g.size, g.kind, sub + g.name, position, int(g.params_per_channel))
                    survey.append((slot, np.asarray(scores[g.id], dtype=np.float64)))
            return experts, []
        passes = [_GivenBudget({k[len(sub):]: v for k, v in budget.items()}, opts.allocate or "global",
                               opts.budget_unit)] if budget is not None else []
        result = PassManager([*passes, PruneChannels(self.options)])(graph)
        record: PruneRecord | None = result.record(PruneRecord)
        return experts, [(prefix + sub + c.name, c.before, c.after) for c in (record.changes if record else [])]

    def plan_hidden(self) -> None:
        """Find the hidden-size group: capture the whole (depth-pruned) model on ``meta`` and analyse it."""
        skeleton, _ = _meta_model(self.folder)
        if self.removed:
            RemoveBlocks(len(self.removed))._apply(skeleton, self.removed, Snapshot(), [])
        graph = capture(skeleton, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
        AnalyzeDependencies()(graph)
        info = graph.analysis(DependencyInfo)
        groups = [g for g in info.iter_groups() if g.kind == "hidden"]
        embeddings = skeleton.get_input_embeddings()  # type: ignore[operator]
        emb = next((f"{n}.weight[1]" for n, m in skeleton.named_modules() if m is embeddings), "")
        why = next((f.reason for f in info.frozen if emb in f.members), None)
        if not groups and why is not None:
            raise BudgetError(f"the hidden size of {type(skeleton).__name__} is frozen (as it is in memory): {why}")
        if len(groups) != 1:
            raise BudgetError(f"{type(skeleton).__name__} has {len(groups)} hidden-size groups; streaming prunes "
                              "exactly one (the residual stream)")
        g = groups[0]
        members = [(m.name, m.dim, info.channel_positions(m, g.id), m.is_param) for m in g.members]
        outside = [n for n, _, _, _ in members if not n.startswith(self.blocks_name + ".")]
        stream_dims = [pos for n, d, pos, _ in members if n in outside and d == 1]
        if any(not np.array_equal(pos, np.arange(g.size)) for pos in stream_dims):
            raise BudgetError(f"the hidden size of {type(skeleton).__name__} is not laid out channel by channel in "
                              "its embeddings; it cannot be streamed")
        state = {**graph.params, **graph.buffers}
        attrs = [(state[p].rpartition(".")[0], attr, atom) for p, attr, atom in info.module_attrs if p in state]
        self.hidden = _HiddenPlan(g, members, attrs, np.zeros(g.size), info.table)  # type: ignore[arg-type]

    def _hidden_how(self) -> tuple[str, bool]:
        return {"l1": "l1", "l2": "l2", "maw": "max"}[self.opts.importance or "l2"], self.opts.importance == "maw"

    def _add_hidden(self, per: np.ndarray, positions: np.ndarray) -> None:
        plan = self.hidden
        assert plan is not None
        _, maw = self._hidden_how()
        red = _reduce_positions(per, positions, plan.group.size, "max" if maw else "sum")
        plan.scores = np.maximum(plan.scores, red) if maw else plan.scores + red

    def score_hidden(self, position: int, block: nn.Module) -> None:
        """Add the contributions of block ``position``'s hidden-size members (as :class:`ScoreChannels` does)."""
        assert self.hidden is not None
        how, _ = self._hidden_how()
        prefix = f"{self.blocks_name}.{position}."
        for name, dim, pos, is_param in self.hidden.members:
            if is_param and name.startswith(prefix):
                self._add_hidden(_per_position(block.get_parameter(name[len(prefix):]), dim, how), pos)

    def stored_name(self, name: str) -> str:
        """The checkpoint's name of a tensor of the model (a tied weight is stored under one of its names)."""
        if name in self.source:
            return name
        target = dict(self.model.named_parameters(remove_duplicate=False)).get(name)
        for alias, t in self.model.named_parameters(remove_duplicate=False):
            if t is target and alias in self.source:
                return alias
        raise CheckpointError(f"the checkpoint in '{self.folder}' lacks '{name}'")

    def finish_hidden(self) -> None:
        """Add the embeddings', final norm's and LM head's contributions (read in row chunks); choose the channels."""
        plan = self.hidden
        assert plan is not None
        how, maw = self._hidden_how()
        for name, dim, pos, is_param in plan.members:
            if not is_param or name.startswith(self.blocks_name + "."):
                continue
            stored = self.stored_name(name)
            per: np.ndarray | None = None
            pieces = [self.source.load([stored])[stored]] if dim == 0 else self.source.chunks(stored,
                                                                                            self.opts.chunk_bytes)
            for piece in pieces:
                self.peak_weights = max(self.peak_weights, piece.numel() * piece.element_size())
                p = _per_position(piece, dim, how)
                per = p if per is None else (np.maximum(per, p) if maw else per + p)
            assert per is not None
            self._add_hidden(per, pos)
        scores = np.sqrt(plan.scores) if self.opts.importance == "l2" else plan.scores
        g = plan.group
        kept = _round_keep(g, g.size - int(round(g.size * float(self.opts.hidden or 0.0))), self.options)
        if kept >= g.size:
            self.hidden = None
            return
        plan.keep = np.sort(np.argsort(-scores, kind="stable")[:kept])
        memo: dict[int, int] = {}
        table = plan.table
        plan.attrs = [(module, attr, table.sized(atom, {g.id: kept}, memo)) for module, attr, atom in plan.attrs
                      if table.sized(atom, {g.id: kept}, memo) != table.sized(atom, {}, {})]

    def survey(self) -> dict[int, dict[str, float]] | None:
        """First pass over the blocks: width scores of every block, then one ranking or allocation over all.

        The hidden size's scores are gathered in the same pass.

        Returns:
            Per block position, the fraction to remove per group name (None: width is decided block by block).

        """
        opts = self.opts
        self.walks += 1
        streams = self.streams()
        found: list[tuple[_Slot, np.ndarray]] = []
        influence: list[float] = []
        for position in track(range(len(self.order)), "scoring blocks"):
            block = self.load(position, copy.deepcopy(self.blocks.get_submodule(str(position))))
            start = len(found)
            bi: list[float] = []
            with torch.no_grad():
                self.transform(position, block, streams, survey=found, influence=bi)
                if self.hidden is not None:
                    self.score_hidden(position, block)
            influence.extend([bi[0] if bi else 0.0] * (len(found) - start))
            self.note_activations(streams)
            del block
            _release_memory()
        if self.hidden is not None:
            self.finish_hidden()
        if not opts.surveyed:
            return None
        if not found:
            raise BudgetError(f"no {'/'.join(k for k, _ in opts.kind_ratios)} groups to rank across the blocks")
        slots = [s for s, _ in found]
        scores = {s.id: v for s, v in found}
        if opts.allocate is not None:
            weights = {s.id: float(s.params_per_channel) if opts.budget_unit == "params" else 1.0 for s in slots}
            importance = None
            if opts.allocate == "cfsp":
                total = all_reduce_sum({**{i: v for i, v in enumerate(influence)}, "n": float(len(self.first))})
                importance = np.asarray([total[i] / max(total["n"], 1.0) for i in range(len(slots))])
            allocator = AllocateBudget(0.0, opts.allocate, unit=opts.budget_unit, min_keep=opts.min_keep,
                                       kind_ratios=dict(opts.kind_ratios))
            ratios = allocator.allocate(slots, scores, weights, importance, {s.id: s.kind for s in slots})
        else:
            ratios = self._global_ranking(slots, scores)
        out: dict[int, dict[str, float]] = {}
        for s in slots:
            out.setdefault(s.position, {})[s.name] = ratios.get(s.id, 0.0)
        return out

    def _global_ranking(self, slots: list[_Slot], scores: dict[int, np.ndarray]) -> dict[int, float]:
        """Per kind, one ranking of scores normalised by each group's mean; the lowest ``ratio`` go.

        This is ``scope="global"`` of :func:`~secateurs.passes.channels.plan_keep` over every block's groups.
        """
        out: dict[int, float] = {}
        for kind, ratio in self.opts.kind_ratios:
            pool: list[tuple[float, int]] = []
            for s in slots:
                if s.kind != kind:
                    continue
                v = scores[s.id]
                mean = float(np.mean(v)) if v.size else 0.0
                pool.extend((float(x), s.id) for x in (v / mean if mean > 0 else np.zeros_like(v)))
            pool.sort(key=lambda t: t[0])
            removed: dict[int, int] = {}
            for _, sid in pool[:int(round(len(pool) * ratio))]:
                removed[sid] = removed.get(sid, 0) + 1
            out.update({s.id: removed.get(s.id, 0) / s.size for s in slots if s.kind == kind})
        return out

    def _outside_cuts(self) -> dict[str, tuple[int, np.ndarray]]:
        """Per stored tensor outside the blocks, the hidden-size dim and the flat indices it keeps."""
        if self.hidden is None:
            return {}
        cuts, _ = self.hidden.cuts("")
        return {self.stored_name(name): (dim, idx) for name, dim, idx in cuts
                if not name.startswith(self.blocks_name + ".")}

    def _passthrough(self, name: str, outside: dict[str, tuple[int, np.ndarray]]) -> tuple[Any, ...]:
        """A copied-through tensor for :meth:`ShardedWriter.stream_shard`, sliced when the hidden size is pruned."""
        info = self.source.info(name)
        if name not in outside:
            return name, info.dtype, info.shape, functools.partial(self.source.chunks, name, self.opts.chunk_bytes)
        dim, idx = outside[name]
        index = torch.from_numpy(idx)
        shape = tuple(len(idx) if d == dim else v for d, v in enumerate(info.shape))

        def pieces() -> Iterable[torch.Tensor]:
            if dim == 0:
                yield self.source.load([name])[name].index_select(0, index)
                return
            for chunk in self.source.chunks(name, self.opts.chunk_bytes):
                yield chunk.index_select(dim, index)

        return name, info.dtype, shape, pieces

    def _sync_expert_count(self, changes: list[ExpertChange]) -> None:
        """The top-level model's expert count (its load-balancing loss) follows when every block agrees.

        :class:`~secateurs.passes.experts.PruneExperts` does this itself when it sees the whole model.
        """
        counts = {b.num_experts for b in find_moe_blocks(self.model)}
        olds = {c.before for c in changes if c.what == "experts"}
        if len(counts) == 1 and len(olds) == 1 and getattr(self.model, "num_experts", None) == olds.pop():
            setattr(self.model, "num_experts", counts.pop())  # noqa: B010 - nn.Module attribute typing

    def write(self, dst: str | os.PathLike[str], overwrite: bool,
              budget: dict[int, dict[str, float]] | None) -> tuple[list[Any], list[Any], list[Any], int, bool]:
        """The last pass: transform, sparsify and write every block, then copy the rest through."""
        opts = self.opts
        self.walks += 1
        streams = self.streams()
        sparsifier = (SparsifyWeights(opts.sparsity or 0.0, nm=opts.nm, criterion=opts.sparsity_criterion,  # type: ignore[arg-type]
                                      keep_masks=False, block=opts.block, damp=opts.damp) if opts.sparse else None)
        groups = _passthrough_groups(self.passthrough, self.source, opts.max_shard_bytes)
        n = len(self.order)
        total = n + len(groups)
        widths: list[tuple[str, int, int]] = []
        experts: list[ExpertChange] = []
        sparsity: list[tuple[str, float]] = []
        probe = self.probe_call() if is_writer() else None
        probes: list[tuple[str, Call, torch.Tensor]] = []  # what each written block gives on the probe
        digests: list[dict[str, int]] = []  # and the bytes of each of its tensors
        moe = bool(find_moe_blocks(self.model))
        per_expert = moe and (opts.expert_layout == "per-expert" or (opts.expert_layout == "source"
                                                                     and self.per_expert_source))
        self.expert_layout = None if not moe else {
            "written": "per-expert" if per_expert else "fused",
            "why": "asked for" if opts.expert_layout != "source" else
            f"the source stores its experts {'one by one' if self.per_expert_source else 'fused'}"}
        with ShardedWriter(dst, overwrite=overwrite, enabled=is_writer()) as writer:
            for position in track(range(n), "streaming blocks"):
                prefix = f"{self.blocks_name}.{position}."
                block = self.load(position, self.blocks.get_submodule(str(position)))
                changed, width = self.transform(position, block, streams,
                                                budget=None if budget is None else budget.get(position, {}))
                experts += changed
                widths += width
                if self.hidden is not None:
                    slice_dims(block, *self.hidden.cuts(prefix))
                self.note_activations(streams)
                if sparsifier is not None:
                    targets: list[tuple[str, nn.Module]] = [
                        (prefix + name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
                    stream = streams.get("pruned")
                    record = sparsifier.sparsify_layers(
                        targets, (lambda: _forward(block, stream)) if stream is not None else None)  # noqa: B023
                    sparsity.extend(record.layers)
                    if stream is not None and position + 1 < n:
                        streams["pruned"], _ = _forward(block, stream)
                state = {prefix + k: v for k, v in block.state_dict().items()}
                if writer.enabled:
                    probes.append(self.probe(block, position, probe))
                    digests.append({k[len(prefix):]: digest(v) for k, v in state.items()})
                writer.write_shard(shard_name(position + 1, total),
                                   per_expert_state(self.model, state) if per_expert else state)
                del state
                block.to("meta")
                _release_memory()
            streams.clear()
            outside = self._outside_cuts()
            for j, group in enumerate(track(groups, "copying embeddings and head")):
                writer.stream_shard(shard_name(n + j + 1, total), [self._passthrough(name, outside) for name in group])
                self.peak_weights = max(self.peak_weights,
                                        min(max(self.source.info(name).nbytes for name in group), opts.chunk_bytes))
            if self.hidden is not None:
                assert self.hidden.keep is not None
                size = self.hidden.group.size
                widths.append((f"hidden size: {self.hidden.group.name}", size, len(self.hidden.keep)))
                slice_dims(self.model, [(name, dim, idx) for name, (dim, idx) in outside.items()],
                           self.hidden.cuts("")[1])
            self._sync_expert_count(experts)
            plain = False
            if writer.enabled:
                layout = describe(self.model)
                plain = layout.plain_loadable
                folder = self.folder
                if per_expert and not plain:
                    if opts.expert_layout == "per-expert":
                        raise BudgetError("the per-expert layout is read by plain from_pretrained only, and this "
                                          "pruning is not expressible in the config (per-layer sizes); write the "
                                          "fused layout instead")
                    log.warning("the source stores its experts one by one, but the per-expert layout loads with plain "
                                "from_pretrained only and this pruning has per-layer sizes: writing the fused layout")
                    for position in range(n):  # the blocks again, converted back (what load_pretrained reads)
                        writer.rewrite_shard(shard_name(position + 1, total),
                                             lambda t: fused_state(self.model, t, str(self.folder)))
                    per_expert = False
                    self.expert_layout = {"written": "fused", "why": "the source is per-expert, but the per-expert "
                                          "layout is read by plain from_pretrained only and this pruning has "
                                          "per-layer sizes"}
                if per_expert:
                    layout.manifest["expert_layout"] = "per-expert"

                def extras(tmp: Path) -> None:
                    layout.config.save_pretrained(tmp)
                    (tmp / MANIFEST).write_text(json.dumps(layout.manifest, indent=1, sort_keys=True))
                    for fname in ("generation_config.json", *TOKENIZER_FILES):
                        if (folder / fname).is_file():
                            shutil.copy2(folder / fname, tmp / fname)
                    copies = [(name, self._passthrough(name, outside)[3]) for name in self.passthrough]
                    check_streamed_reload(tmp, self.model, self.blocks_name, probes, plain, copies=copies,
                                          chunk_bytes=opts.chunk_bytes, per_expert=per_expert, digests=digests)

                writer.commit(extras)
        return widths, experts, sparsity, total, plain


def resolve_defaults(opts: StreamOptions, *, calibrated: bool) -> StreamOptions:
    """``opts`` with the default width criterion filled in, as :func:`secateurs.prune` chooses it.

    ``flap`` with bias compensation when calibration batches are given (and the hidden size, which streams with
    weight criteria only, is not pruned); the best weight-only criterion otherwise.
    """
    from secateurs.api import WEIGHT_DEFAULT

    importance = opts.importance
    if importance is None:
        importance = "flap" if calibrated and not opts.hidden else WEIGHT_DEFAULT
    compensate = opts.bias_compensation
    if compensate is None:
        compensate = importance == "flap" and opts.width
    return dataclasses.replace(opts, importance=importance, bias_compensation=compensate)


def prune_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: StreamOptions | None = None,
    *,
    calib: Iterable[Any] | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> StreamReport:
    """Prune the checkpoint folder ``src`` block by block into ``dst`` without loading the whole model.

    Args:
        src: A Hugging Face checkpoint folder with safetensors weights (sharded or not) of a decoder-only
            architecture of ``transformers`` (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE, ...).
        dst: The output folder; complete or absent after the call.
        options: What to do (:class:`StreamOptions`); ``kwargs`` are its fields as keywords instead.
        calib: Calibration batches of token ids (tensors, or dicts with ``input_ids`` and optionally
            ``attention_mask``) for depth, experts, the ``cfsp`` allocator, ``activation`` / ``flap`` importance
            and ``wanda`` / ``sparsegpt``.
        overwrite: Replace an existing ``dst`` (only once the new one is complete).
        **kwargs: :class:`StreamOptions` fields (``ffn=0.25, heads=0.25, nm="2:4"``).

    Returns:
        The report, with the peak memory the run needed.

    Raises:
        BudgetError: An option is invalid, calibration is needed and missing, or the model has no blocks.
        CheckpointError: ``src`` is not a readable checkpoint, lacks a tensor, or ``dst`` exists.

    """
    start = time.perf_counter()
    try:
        opts = dataclasses.replace(options, **kwargs) if options is not None else StreamOptions(**kwargs)
    except TypeError as exc:
        raise BudgetError(f"prune_checkpoint(): {exc}") from exc
    opts = resolve_defaults(opts, calibrated=calib is not None)
    guard_source(src, dst)
    # before any pass over the weights, and on every rank (the others would wait for the writer forever)
    taken = is_writer() and Path(dst).exists() and not overwrite
    if all_reduce_sum({"output exists": int(taken)})["output exists"]:
        raise CheckpointError(f"output folder '{dst}' exists; pass overwrite=True to replace it")
    batches = None
    if calib is not None and opts.calibrated:
        everything = _batches(calib)
        if len(everything) < world_size():
            raise BudgetError(f"{len(everything)} calibration batches for {world_size()} processes: every process "
                              "needs at least one")
        batches = shard(everything)  # this rank's share, carried from block to block
    with presharded():
        walker = _Walker(Path(src), opts, batches)
        removed: list[tuple[str, float]] = []
        depth_scores: list[tuple[str, float]] = []
        if opts.layers:
            removed, depth_scores = walker.depth()
        if opts.hidden:
            walker.plan_hidden()
        budget = walker.survey() if opts.surveys else None
        widths, experts, sparsity, total, plain = walker.write(dst, overwrite, budget)
    barrier()
    return StreamReport(Path(dst), len(walker.order), tuple(widths), tuple(sparsity), walker.peak_weights,
                        walker.block_bytes, walker.model_bytes, walker.peak_acts, total, plain,
                        time.perf_counter() - start, tuple(experts), tuple(removed), tuple(depth_scores), walker.walks,
                        len(batches or []), getattr(walker, "expert_layout", None))
