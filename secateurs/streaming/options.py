"""What a streamed prune is asked to do (:class:`StreamOptions`) and what it did (:class:`StreamReport`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from secateurs.errors import BudgetError
from secateurs.passes.criteria import criteria_names, step_criteria
from secateurs.passes.experts import ExpertChange
from secateurs.spec import OPTIONS, PruneSpec

STREAM_IMPORTANCE = criteria_names(("weights", "calibration"))  # a loss over the whole model is not streamed
STREAM_ALLOCATORS = OPTIONS["allocate"].choices["stream"]  # type: ignore[index]
_CALIBRATED_IMPORTANCE = criteria_names(("calibration",))  # what the registry says needs calibration batches
_CALIBRATED_SPARSITY = step_criteria("sparsity", ("calibration",))
_WIDTH_KINDS = ("heads", "kv_groups", "ffn")

Call = tuple[tuple[Any, ...], dict[str, Any]]


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
        uniform: Equalise the allocator's per-block ratios per structure (every block keeps the same sizes).
        tensor_parallel: Keep every block's heads, KV groups, FFN width (and the hidden size) shardable over this
            many ranks (as :func:`secateurs.prune`).
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
    tensor_parallel: int = 1
    uniform: bool = False
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
        """Check the pruning options with the schema every path shares (:class:`~secateurs.spec.PruneSpec`)."""
        spec = self.spec()
        object.__setattr__(self, "nm", spec.nm)
        if self.expert_layout not in ("source", "fused", "per-expert"):
            raise BudgetError(f"unknown expert layout {self.expert_layout!r}; choose source, fused or per-expert")
        if self.chunk_bytes < 1 or self.max_shard_bytes < 1:
            raise BudgetError("chunk_bytes and max_shard_bytes must be positive")

    def spec(self) -> PruneSpec:
        """The pruning options as a :class:`~secateurs.spec.PruneSpec`, checked for the streamed path.

        A field left at its default counts as not given (``scope="local"`` with nothing to scope is accepted).
        """
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name in OPTIONS and getattr(self, f.name) != f.default}
        try:
            spec = PruneSpec(**given)
        except TypeError as exc:  # pragma: no cover - the field names are the schema's
            raise BudgetError(str(exc)) from exc
        spec.check("stream")
        return spec

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
        path: The output folder (None for a dry run: nothing was written).
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

    path: Path | None
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
        into = f"into {self.path} ({self.shards} shards" if self.path is not None else "(dry run: nothing written"
        lines = [f"streamed {self.blocks} blocks {into}, {self.passes} "
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
    weight criteria only, is not pruned); the best weight-only criterion otherwise
    (:meth:`secateurs.spec.PruneSpec.resolved`).
    """
    spec = opts.spec().resolved(calibrated=calibrated, path="stream")
    importance = spec.importance if isinstance(spec.importance, str) else None  # a stream spec takes names only
    return dataclasses.replace(opts, importance=importance, bias_compensation=spec.bias_compensation)
