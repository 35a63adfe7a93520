"""Out-of-core pruning: prune a sharded Hugging Face checkpoint one decoder block at a time.

The model is built on the ``meta`` device (no memory), then for every decoder block in turn: its weights are
read from the safetensors shards (:class:`~secateurs.backends.sharded.ShardedSource`), the FFN width is
pruned by the same passes :func:`secateurs.prune` runs (captured on the block's MLP alone), its linear layers
are sparsified (:meth:`~secateurs.passes.sparsity.SparsifyWeights.sparsify_layers`), the block is written as
its own shard and goes back to ``meta``. Embeddings, the final norm and the LM head are copied through in row
chunks. The output is a sharded checkpoint with ``model.safetensors.index.json``, the config and the
``secateurs.json`` manifest, so :func:`secateurs.load_pretrained` loads it (and plain ``from_pretrained`` too
when the pruning is uniform); it is written into a temporary folder renamed into place at the end, so an
interrupted run leaves nothing.

Peak memory is one block's weights plus the calibration activations (:class:`StreamReport` measures both).

Calibrated criteria carry the calibration batches' hidden states from block to block:

* activation-scored FFN width (``importance="activation"`` / ``"flap"``) reads the MLP inputs of the dense
  model, as :func:`secateurs.prune` does;
* ``wanda`` / ``sparsegpt`` sparsity read the inputs of each block after the previous blocks were pruned,
  as :func:`secateurs.prune` does with ``sequential=True``.

So ``prune_checkpoint(src, dst, ffn=f, importance=i, nm="2:4", sparsity_criterion=c, calib=b)`` gives the
weights of ``prune(model, ..., ffn=f, importance=i, nm="2:4", sparsity_criterion=c, calib=b, sequential=True)``.
Under ``torchrun`` each rank carries its share of the batches, statistics are summed over the ranks and rank
0 writes (see :mod:`secateurs.distributed`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.backends.checkpoint import MANIFEST, TOKENIZER_FILES, describe
from secateurs.backends.sharded import ShardedSource, ShardedWriter, shard_name
from secateurs.distributed import barrier, is_writer, presharded, shard
from secateurs.errors import BudgetError, CheckpointError
from secateurs.frontends.torch_export import capture
from secateurs.passes.base import PassManager
from secateurs.passes.channels import ChannelOptions, PruneChannels, PruneRecord
from secateurs.passes.dependencies import AnalyzeDependencies
from secateurs.passes.hooks import first_tensor, hidden_input
from secateurs.passes.importance import ScoreChannels
from secateurs.passes.sparsity import SparsifyWeights
from secateurs.progress import track

__all__ = ["STREAM_IMPORTANCE", "StreamOptions", "StreamReport", "prune_checkpoint"]

log = logging.getLogger(__name__)

STREAM_IMPORTANCE = ("l1", "l2", "maw", "activation", "flap")
_CALIBRATED_IMPORTANCE = ("activation", "flap")
_CALIBRATED_SPARSITY = ("wanda", "sparsegpt")

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """What :func:`prune_checkpoint` does to every block.

    Attributes:
        ffn: Fraction of each MLP's neurons to remove (None: keep the width).
        importance: FFN neuron importance: ``l1``, ``l2``, ``maw`` (weights only) or ``activation`` / ``flap``
            (calibrated on the dense model's MLP inputs).
        round_to: Keep every FFN width a multiple of this.
        min_keep: Keep at least this fraction of each MLP's neurons.
        sparsity: Unstructured weight sparsity of every linear layer in the blocks.
        nm: N:M sparsity, ``(2, 4)`` or ``"2:4"``.
        sparsity_criterion: ``magnitude``, or ``wanda`` / ``sparsegpt`` (calibrated block by block).
        block: SparseGPT column block size.
        damp: SparseGPT dampening.
        chunk_bytes: Largest piece of a copied-through tensor (embeddings, LM head) held at once.
        max_shard_bytes: Largest output shard of copied-through tensors (each block is one shard).

    """

    ffn: float | None = None
    importance: str = "l2"
    round_to: int = 8
    min_keep: float = 0.1
    sparsity: float | None = None
    nm: tuple[int, int] | str | None = None
    sparsity_criterion: str = "magnitude"
    block: int = 128
    damp: float = 0.01
    chunk_bytes: int = 64 << 20
    max_shard_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.ffn is not None and not 0.0 <= self.ffn < 1.0:
            raise BudgetError(f"ffn ratio must be in [0, 1), got {self.ffn!r}")
        if self.importance not in STREAM_IMPORTANCE:
            raise BudgetError(f"importance {self.importance!r} cannot stream block by block; choose from "
                              f"{STREAM_IMPORTANCE} (taylor needs the whole model's loss)")
        if self.sparsity_criterion not in ("magnitude", *_CALIBRATED_SPARSITY):
            raise BudgetError(f"sparsity criterion {self.sparsity_criterion!r} cannot stream block by block; "
                              "choose magnitude, wanda or sparsegpt")
        if isinstance(self.nm, str):
            try:
                n, m = (int(v) for v in self.nm.split(":"))
            except ValueError as exc:
                raise BudgetError(f"nm must look like '2:4', got {self.nm!r}") from exc
            object.__setattr__(self, "nm", (n, m))
        if self.chunk_bytes < 1 or self.max_shard_bytes < 1:
            raise BudgetError("chunk_bytes and max_shard_bytes must be positive")

    @property
    def sparse(self) -> bool:
        """Whether the blocks are sparsified."""
        return self.sparsity is not None or self.nm is not None

    @property
    def dense_stream(self) -> bool:
        """Whether FFN scoring needs the dense model's activations."""
        return bool(self.ffn) and self.importance in _CALIBRATED_IMPORTANCE

    @property
    def pruned_stream(self) -> bool:
        """Whether sparsity needs the pruned blocks' activations."""
        return self.sparse and self.sparsity_criterion in _CALIBRATED_SPARSITY


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """What :func:`prune_checkpoint` did and the memory it needed.

    Attributes:
        path: The output folder.
        blocks: How many decoder blocks were streamed.
        widths: ``(MLP group, width before, width after)`` per block that was width-pruned.
        sparsity: ``(layer, fraction of zero weights)`` per sparsified layer.
        peak_weight_bytes: Most checkpoint tensor bytes loaded at once (one block, or a copied chunk).
        block_bytes: The largest block's weights in bytes.
        model_bytes: All tensors of the source checkpoint in bytes.
        peak_activation_bytes: Most calibration activations alive at once (0 without calibration).
        shards: Output shard files written.
        plain_loadable: Whether plain ``from_pretrained`` loads the output too (False on ranks that do not write).
        seconds: Wall time.

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

    def summary(self) -> str:
        """A few lines for the console."""
        mib = 1 << 20
        lines = [f"streamed {self.blocks} blocks into {self.path} ({self.shards} shards) in {self.seconds:.1f} s",
                 f"peak weights loaded {self.peak_weight_bytes / mib:.1f} MiB (largest block "
                 f"{self.block_bytes / mib:.1f} MiB, model {self.model_bytes / mib:.1f} MiB); "
                 f"calibration activations {self.peak_activation_bytes / mib:.1f} MiB"]
        if self.widths:
            before, after = sum(w[1] for w in self.widths), sum(w[2] for w in self.widths)
            lines.append(f"FFN width {before} -> {after} neurons over {len(self.widths)} blocks")
        if self.sparsity:
            lines.append(f"mean sparsity {sum(s for _, s in self.sparsity) / len(self.sparsity):.1%} "
                         f"over {len(self.sparsity)} layers")
        return "\n".join(lines)


class _Stop(Exception):  # noqa: N818 - control flow only
    pass


def _meta_model(folder: Path) -> tuple[nn.Module, Any]:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"'{folder / 'config.json'}' could not be read: {exc}") from exc
    name = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        what = f"architecture {name!r}, which transformers lacks" if name else "no architecture ('architectures')"
        raise CheckpointError(f"'{folder / 'config.json'}' names {what}; it cannot be streamed")
    with torch.device("meta"):
        model = cls._from_config(config)
    return model, config


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
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch = {"input_ids": batch[0]}
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


def _forward(block: nn.Module, calls: list[Call], mlp: nn.Module | None = None) -> tuple[list[Call], list[Any]]:
    """``block``'s outputs as the next block's calls, and the MLP's inputs when ``mlp`` is given."""
    seen: list[Any] = []
    handle = None
    if mlp is not None:
        handle = mlp.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(hidden_input(args, kwargs).detach()), with_kwargs=True)
    try:
        out = []
        with torch.no_grad():
            for args, kwargs in calls:
                hidden = first_tensor(block(*args, **kwargs))
                if hidden is None:
                    raise BudgetError(f"{type(block).__name__} returned no tensor; the next block has no input")
                out.append(((hidden.detach(), *args[1:]), kwargs))
    finally:
        if handle is not None:
            handle.remove()
    return out, seen


def _prune_ffn(mlp: nn.Module, name: str, opts: StreamOptions, calib: list[Any] | None) -> tuple[str, int, int]:
    """Width-prune one MLP with the passes :func:`secateurs.prune` runs; ``(group, before, after)``."""
    first = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise BudgetError(f"MLP '{name}' has no linear layer to prune")
    example = calib[0] if calib else torch.zeros(1, 1, first.in_features, dtype=first.weight.dtype)
    options = ChannelOptions(ratio=0.0, round_to=opts.round_to, min_keep=opts.min_keep,
                             kind_ratios=(("ffn", float(opts.ffn or 0.0)),))
    passes = [AnalyzeDependencies(), ScoreChannels(opts.importance, calib=calib), PruneChannels(options)]
    result = PassManager(passes)(capture(mlp, (example,)))
    record: PruneRecord | None = result.record(PruneRecord)
    changes = [c for c in (record.changes if record else []) if c.kind == "ffn"]
    if not changes:
        raise BudgetError(f"MLP '{name}' ({type(mlp).__name__}) has no FFN neurons to prune")
    return f"{name}.{changes[0].name}", changes[0].before, changes[0].after


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
            architecture of ``transformers`` (Llama, Mistral, Qwen2, ...).
        dst: The output folder; complete or absent after the call.
        options: What to do (:class:`StreamOptions`); ``kwargs`` are its fields as keywords instead.
        calib: Calibration batches of token ids (tensors, or dicts with ``input_ids`` and optionally
            ``attention_mask``) for ``activation`` / ``flap`` importance and ``wanda`` / ``sparsegpt``.
        overwrite: Replace an existing ``dst`` (only once the new one is complete).
        **kwargs: :class:`StreamOptions` fields (``ffn=0.25, nm="2:4"``).

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
    folder = Path(src)
    source = ShardedSource(folder)
    model, config = _meta_model(folder)
    blocks_name = _block_list(model, config)
    blocks = model.get_submodule(blocks_name)
    known = set(model.state_dict())
    skipped = sorted(n for n in source.tensors if n not in known)
    if skipped:
        log.warning("%d stored tensors are not part of %s and are dropped: %s", len(skipped),
                    type(model).__name__, ", ".join(skipped[:5]))
    passthrough = [n for n in model.state_dict() if n in source and not n.startswith(blocks_name + ".")]
    keys = [list(b.state_dict()) for b in blocks.children()]
    for i, block_keys in enumerate(keys):
        missing = [f"{blocks_name}.{i}.{k}" for k in block_keys if f"{blocks_name}.{i}.{k}" not in source]
        if missing:
            raise CheckpointError(f"the checkpoint in '{folder}' lacks block tensors, e.g. '{missing[0]}'")
    block_bytes = max(sum(source.info(f"{blocks_name}.{i}.{k}").nbytes for k in ks) for i, ks in enumerate(keys))
    model_bytes = sum(source.info(n).nbytes for n in source.tensors)
    dtype = source.info(f"{blocks_name}.0.{keys[0][0]}").dtype
    dense: list[Call] | None = None
    pruned: list[Call] | None = None
    if opts.dense_stream or opts.pruned_stream:
        if calib is None:
            raise BudgetError(f"importance {opts.importance!r} / sparsity criterion {opts.sparsity_criterion!r} "
                              "need calibration batches (calib=...)")
        first = _first_inputs(model, blocks_name, source, shard(_batches(calib)), dtype)
        dense = first if opts.dense_stream else None
        pruned = first if opts.pruned_stream else None
    sparsifier = (SparsifyWeights(opts.sparsity or 0.0, nm=opts.nm, criterion=opts.sparsity_criterion,  # type: ignore[arg-type]
                                  keep_masks=False, block=opts.block, damp=opts.damp) if opts.sparse else None)
    groups = _passthrough_groups(passthrough, source, opts.max_shard_bytes)
    total = len(keys) + len(groups)
    widths: list[tuple[str, int, int]] = []
    sparsity: list[tuple[str, float]] = []
    peak_weights = peak_acts = 0
    with ShardedWriter(dst, overwrite=overwrite, enabled=is_writer()) as writer, presharded():
        for i in track(range(len(keys)), "streaming blocks"):
            prefix = f"{blocks_name}.{i}."
            block = blocks.get_submodule(str(i))
            loaded = source.load([prefix + k for k in keys[i]])
            peak_weights = max(peak_weights, sum(t.numel() * t.element_size() for t in loaded.values()))
            block.load_state_dict({k: loaded[prefix + k] for k in keys[i]}, assign=True, strict=True)
            del loaded
            unset = [n for n, t in (*block.named_parameters(), *block.named_buffers()) if t.is_meta]
            if unset:
                raise CheckpointError(f"block '{prefix[:-1]}' has tensors the checkpoint does not store, e.g. "
                                      f"'{unset[0]}'; it cannot be streamed")
            block.eval()
            mlp = getattr(block, "mlp", None)
            mlp_inputs: list[Any] | None = None
            if dense is not None and opts.ffn:
                dense, mlp_inputs = _forward(block, dense, mlp)
            peak_acts = max(peak_acts, _bytes(dense) + _bytes(pruned) + sum(
                t.numel() * t.element_size() for t in mlp_inputs or []))
            if opts.ffn:
                if not isinstance(mlp, nn.Module):
                    raise BudgetError(f"block '{prefix[:-1]}' ({type(block).__name__}) has no mlp to prune")
                widths.append(_prune_ffn(mlp, prefix + "mlp", opts, mlp_inputs))
            del mlp_inputs
            if sparsifier is not None:
                targets: list[tuple[str, nn.Module]] = [
                    (prefix + n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
                stream = pruned
                record = sparsifier.sparsify_layers(
                    targets, (lambda: _forward(block, stream)) if stream is not None else None)  # noqa: B023
                sparsity.extend(record.layers)
                if pruned is not None and i + 1 < len(keys):
                    pruned, _ = _forward(block, pruned)
            writer.write_shard(shard_name(i + 1, total), {prefix + k: v for k, v in block.state_dict().items()})
            block.to("meta")
            _release_memory()
        dense = pruned = None
        for j, group in enumerate(track(groups, "copying embeddings and head")):
            writer.stream_shard(shard_name(len(keys) + j + 1, total), [
                (n, source.info(n).dtype, source.info(n).shape, functools.partial(source.chunks, n, opts.chunk_bytes))
                for n in group])
            peak_weights = max(peak_weights, min(max(source.info(n).nbytes for n in group), opts.chunk_bytes))
        plain = False
        if writer.enabled:
            layout = describe(model)
            plain = layout.plain_loadable

            def extras(tmp: Path) -> None:
                layout.config.save_pretrained(tmp)
                (tmp / MANIFEST).write_text(json.dumps(layout.manifest, indent=1, sort_keys=True))
                for fname in ("generation_config.json", *TOKENIZER_FILES):
                    if (folder / fname).is_file():
                        shutil.copy2(folder / fname, tmp / fname)

            writer.commit(extras)
    barrier()
    return StreamReport(Path(dst), len(keys), tuple(widths), tuple(sparsity), peak_weights, block_bytes,
                        model_bytes, peak_acts, total, plain, time.perf_counter() - start)
