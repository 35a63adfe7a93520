"""Block-level helpers of the streamed prune: the meta model, calibration inputs, forwards, memory release."""

from __future__ import annotations

import ctypes
import functools
import gc
import inspect
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.backends.sharded import ShardedSource
from secateurs.errors import BudgetError, CheckpointError
from secateurs.passes.hooks import first_tensor
from secateurs.streaming.options import Call


class _Stop(Exception):  # noqa: N818 - control flow only
    pass


def _meta_model(folder: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig

    from secateurs.backends.checkpoint_load import _skeleton

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
