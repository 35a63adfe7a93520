"""What a streamed prune is asked to do (:class:`StreamOptions`) and what it did (:class:`StreamReport`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from secateurs.errors import BudgetError
from secateurs.passes.criteria import WeightCriterion, channel_criterion, criteria_names
from secateurs.passes.experts import (
    EXPERT_CRITERIA,
    ExpertChange,
)

STREAM_IMPORTANCE = criteria_names(("weights", "calibration"))  # a loss over the whole model is not streamed
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
            criteria only (``l1``, ``l2``, ``maw``, ``random``), like :func:`secateurs.prune`'s ``hidden=``.
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
        if self.importance is not None:
            channel_criterion(self.importance, needs=("weights", "calibration"), where="a streamed prune (block by block)")
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
        if self.hidden and self.importance is not None and not isinstance(channel_criterion(self.importance),
                                                                          WeightCriterion):
            raise BudgetError(f"the hidden size streams with weight criteria ({', '.join(criteria_names(('weights',)))}), "
                              f"not {self.importance!r}: "
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
