"""The streamed driver's last walk: transform, sparsify and write every block, then copy the rest through.

The blocks are written as shards while they stream (:class:`~secateurs.backends.sharded.ShardedWriter`); the
tensors outside the blocks (embeddings, head) are copied through chunk by chunk, sliced when the hidden size is
pruned; the manifest and config follow, and the written folder is reloaded and checked before it is published.
:meth:`secateurs.streaming.walker._Walker.write` runs it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from secateurs.backends.checkpoint import MANIFEST, TOKENIZER_FILES, describe
from secateurs.backends.expert_layout import fused_state, per_expert_state
from secateurs.backends.sharded import ShardedWriter, shard_name
from secateurs.distributed import is_writer
from secateurs.errors import BudgetError
from secateurs.modeling.rewrite import slice_dims
from secateurs.passes.experts import ExpertChange, find_moe_blocks
from secateurs.passes.sparsity import SparsifyWeights
from secateurs.progress import track
from secateurs.stream_reload import check_streamed_reload, digest
from secateurs.streaming.blocks import _forward, _passthrough_groups, _release_memory
from secateurs.streaming.options import Call

if TYPE_CHECKING:
    from secateurs.streaming.walker import _Walker

__all__ = ["write_blocks"]

log = logging.getLogger("secateurs.stream")


def _outside_cuts(walker: _Walker) -> dict[str, tuple[int, np.ndarray]]:
    """Per stored tensor outside the blocks, the hidden-size dim and the flat indices it keeps."""
    if walker.hidden is None:
        return {}
    cuts, _ = walker.hidden.cuts("")
    return {walker.stored_name(name): (dim, idx) for name, dim, idx in cuts
            if not name.startswith(walker.blocks_name + ".")}


def _passthrough(walker: _Walker, name: str, outside: dict[str, tuple[int, np.ndarray]]) -> tuple[Any, ...]:
    """A copied-through tensor for :meth:`ShardedWriter.stream_shard`, sliced when the hidden size is pruned."""
    info = walker.source.info(name)
    if name not in outside:
        return name, info.dtype, info.shape, functools.partial(walker.source.chunks, name, walker.opts.chunk_bytes)
    dim, idx = outside[name]
    index = torch.from_numpy(idx)
    shape = tuple(len(idx) if d == dim else v for d, v in enumerate(info.shape))

    def pieces() -> Iterable[torch.Tensor]:
        if dim == 0:
            yield walker.source.load([name])[name].index_select(0, index)
            return
        for chunk in walker.source.chunks(name, walker.opts.chunk_bytes):
            yield chunk.index_select(dim, index)

    return name, info.dtype, shape, pieces


def _sync_expert_count(walker: _Walker, changes: list[ExpertChange]) -> None:
    """The top-level model's expert count (its load-balancing loss) follows when every block agrees.

    :class:`~secateurs.passes.experts.PruneExperts` does this itself when it sees the whole model.
    """
    counts = {b.num_experts for b in find_moe_blocks(walker.model)}
    olds = {c.before for c in changes if c.what == "experts"}
    if len(counts) == 1 and len(olds) == 1 and getattr(walker.model, "num_experts", None) == olds.pop():
        setattr(walker.model, "num_experts", counts.pop())  # noqa: B010 - nn.Module attribute typing


def write_blocks(walker: _Walker, dst: str | os.PathLike[str], overwrite: bool,
                 budget: dict[int, dict[str, float]] | None,
                 dry_run: bool = False) -> tuple[list[Any], list[Any], list[Any], int, bool]:
    """The last pass: transform, sparsify and write every block, then copy the rest through.

    With ``dry_run`` every block is pruned and reported the same way, and nothing is written.
    """
    opts = walker.opts
    walker.walks += 1
    walker.kinds = {}
    streams = walker.streams()
    sparsifier = (SparsifyWeights(opts.sparsity or 0.0, nm=opts.nm, criterion=opts.sparsity_criterion,  # type: ignore[arg-type]
                                  keep_masks=False, block=opts.block, damp=opts.damp) if opts.sparse else None)
    groups = _passthrough_groups(walker.passthrough, walker.source, opts.max_shard_bytes)
    n = len(walker.order)
    total = n + len(groups)
    widths: list[tuple[str, int, int]] = []
    experts: list[ExpertChange] = []
    sparsity: list[tuple[str, float]] = []
    probe = walker.probe_call() if is_writer() else None
    probes: list[tuple[str, Call, torch.Tensor]] = []  # what each written block gives on the probe
    digests: list[dict[str, int]] = []  # and the bytes of each of its tensors
    moe = bool(find_moe_blocks(walker.model))
    per_expert = moe and (opts.expert_layout == "per-expert" or (opts.expert_layout == "source"
                                                                 and walker.per_expert_source))
    walker.expert_layout = None if not moe else {
        "written": "per-expert" if per_expert else "fused",
        "why": "asked for" if opts.expert_layout != "source" else
        f"the source stores its experts {'one by one' if walker.per_expert_source else 'fused'}"}
    with ShardedWriter(dst, overwrite=overwrite, enabled=is_writer() and not dry_run) as writer:
        for position in track(range(n), "streaming blocks"):
            prefix = f"{walker.blocks_name}.{position}."
            block = walker.load(position, walker.blocks.get_submodule(str(position)))
            changed, width = walker.transform(position, block, streams,
                                              budget=None if budget is None else budget.get(position, {}))
            experts += changed
            widths += width
            if walker.hidden is not None:
                slice_dims(block, *walker.hidden.cuts(prefix))
            walker.note_activations(streams)
            if sparsifier is not None:
                targets: list[tuple[str, nn.Module]] = [
                    (prefix + name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
                stream = streams.get("pruned")
                record = sparsifier.sparsify_layers(
                    targets, (lambda: _forward(block, stream)) if stream is not None else None)  # noqa: B023
                sparsity.extend(record.layers)
                if stream is not None and position + 1 < n:
                    streams["pruned"], _ = _forward(block, stream)
            if writer.enabled:
                state = {prefix + k: v for k, v in block.state_dict().items()}
                probes.append(walker.probe(block, position, probe))
                digests.append({k[len(prefix):]: digest(v) for k, v in state.items()})
                writer.write_shard(shard_name(position + 1, total),
                                   per_expert_state(walker.model, state) if per_expert else state)
                del state
            block.to("meta")
            _release_memory()
            if position == 0 and n > 1 and budget is None and walker.uniform_blocks():
                walker.require_removal("the first block (and every block has its shapes)")  # refused at once
        walker.require_removal(f"any of the {n} blocks")  # before anything is committed
        streams.clear()
        outside = _outside_cuts(walker)
        for j, group in enumerate(track(groups, "copying embeddings and head")):
            writer.stream_shard(shard_name(n + j + 1, total),
                                [_passthrough(walker, name, outside) for name in group])
            walker.peak_weights = max(walker.peak_weights,
                                      min(max(walker.source.info(name).nbytes for name in group), opts.chunk_bytes))
        if walker.hidden is not None:
            assert walker.hidden.keep is not None
            size = walker.hidden.group.size
            widths.append((f"hidden size: {walker.hidden.group.name}", size, len(walker.hidden.keep)))
            slice_dims(walker.model, [(name, dim, idx) for name, (dim, idx) in outside.items()],
                       walker.hidden.cuts("")[1])
        _sync_expert_count(walker, experts)
        layout = describe(walker.model)  # on every rank: the same decisions, the same errors (no rank left waiting)
        fallback = per_expert and not layout.plain_loadable
        if fallback:
            if opts.expert_layout == "per-expert":
                raise BudgetError("the per-expert layout is read by plain from_pretrained only, and this "
                                  "pruning is not expressible in the config (per-layer sizes); write the "
                                  "fused layout instead")
            per_expert = False
            walker.expert_layout = {"written": "fused", "why": "the source is per-expert, but the per-expert "
                                    "layout is read by plain from_pretrained only and this pruning has "
                                    "per-layer sizes"}
        plain = False
        if writer.enabled:
            plain = layout.plain_loadable
            folder = walker.folder
            if fallback:
                log.warning("the source stores its experts one by one, but the per-expert layout loads with plain "
                            "from_pretrained only and this pruning has per-layer sizes: writing the fused layout")
                for position in range(n):  # the blocks again, converted back (what load_pretrained reads)
                    writer.rewrite_shard(shard_name(position + 1, total),
                                         lambda t: fused_state(walker.model, t, str(walker.folder)))
            if per_expert:
                layout.manifest["expert_layout"] = "per-expert"

            def extras(tmp: Path) -> None:
                layout.config.save_pretrained(tmp)
                (tmp / MANIFEST).write_text(json.dumps(layout.manifest, indent=1, sort_keys=True))
                for fname in ("generation_config.json", *TOKENIZER_FILES):
                    if (folder / fname).is_file():
                        shutil.copy2(folder / fname, tmp / fname)
                copies = [(name, _passthrough(walker, name, outside)[3]) for name in walker.passthrough]
                check_streamed_reload(tmp, walker.model, walker.blocks_name, probes, plain, copies=copies,
                                      chunk_bytes=opts.chunk_bytes, per_expert=per_expert, digests=digests)

            writer.commit(extras)
    return widths, experts, sparsity, total, plain

