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

import dataclasses
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from secateurs.backends.files import guard_source
from secateurs.distributed import all_reduce_sum, barrier, is_writer, presharded, shard, world_size
from secateurs.errors import BudgetError, CheckpointError
from secateurs.streaming.blocks import _batches
from secateurs.streaming.options import (
    STREAM_ALLOCATORS,
    STREAM_IMPORTANCE,
    StreamOptions,
    StreamReport,
    resolve_defaults,
)
from secateurs.streaming.walker import _Walker

__all__ = ["STREAM_ALLOCATORS", "STREAM_IMPORTANCE", "StreamOptions", "StreamReport", "prune_checkpoint",
           "resolve_defaults"]


def prune_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    options: StreamOptions | None = None,
    *,
    calib: Iterable[Any] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    **kwargs: Any,
) -> StreamReport:
    """Prune the checkpoint folder ``src`` block by block into ``dst`` without loading the whole model.

    Args:
        src: A Hugging Face checkpoint folder with safetensors weights (sharded or not) of a decoder-only
            architecture of ``transformers`` (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE, ...).
        dst: The output folder; complete or absent after the call (None with ``dry_run``).
        options: What to do (:class:`StreamOptions`); ``kwargs`` are its fields as keywords instead.
        calib: Calibration batches of token ids (tensors, or dicts with ``input_ids`` and optionally
            ``attention_mask``) for depth, experts, the ``cfsp`` allocator, ``activation`` / ``flap`` importance
            and ``wanda`` / ``sparsegpt``.
        overwrite: Replace an existing ``dst`` (only once the new one is complete).
        dry_run: Prune every block and report, one block in memory at a time, and write nothing.
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
    if dst is None and not dry_run:
        raise BudgetError("an output folder is required (or dry_run=True)")
    if dst is not None and not dry_run:
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
        # with dry_run the writer is off: nothing is created, the path is never opened
        widths, experts, sparsity, total, plain = walker.write(src if dst is None or dry_run else dst, overwrite,
                                                               budget, dry_run)
    barrier()
    return StreamReport(None if dry_run else Path(str(dst)), len(walker.order), tuple(widths), tuple(sparsity), walker.peak_weights,
                        walker.block_bytes, walker.model_bytes, walker.peak_acts, total, plain,
                        time.perf_counter() - start, tuple(experts), tuple(removed), tuple(depth_scores), walker.walks,
                        len(batches or []), getattr(walker, "expert_layout", None))
