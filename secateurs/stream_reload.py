"""The reload check of a streamed checkpoint, before its folder is renamed into place.

:func:`secateurs.backends.checkpoint.check_reload` reloads a whole output and compares it with the verified
model; a streamed output may not fit in memory, so it is checked in three parts that together cover the
whole model:

1. the model the claimed loader builds (plain ``from_pretrained`` builds it from ``config.json`` alone,
   :func:`secateurs.load_pretrained` from the config and ``secateurs.json``), on the ``meta`` device: it must
   hold exactly the written tensors, with their shapes, and nothing the checkpoint lacks (which
   ``from_pretrained`` would initialise at random);
2. the size-derived constants of every module outside the blocks (Gemma's ``embed_scale``, rotary sizes and
   scaling, norms' epsilons), which loaders recompute from the config, and every buffer's shape must equal
   those of the streamed (verified) model (the constants inside the blocks, such as attention ``scaling``,
   are judged by the blocks' outputs);
3. every written block, read back from the written shards into the loader's module, must give the outputs
   the streamed block gave on one probe call (recorded just before the block was written): the first block's
   inputs with random hidden states, or, for models whose preamble cannot be rebuilt outside the blocks
   (Gemma's scaled embedding), the block's MLP on random inputs; and every tensor read back must have the
   bytes (CRC-32, :func:`digest`) of the tensor that was verified and written, so an expert the probe does not
   route to is checked too (per-expert outputs are read through transformers' conversion into the fused layout,
   as ``from_pretrained`` reads them);
4. every tensor outside the blocks (embeddings, final norm, LM head), read back from the written shards in
   chunks, must equal, bit for bit, the source's tensor with the pruned hidden channels sliced away (what the
   verified model holds there).

Cost: the output's blocks are read once more, plus one block forward on the probe per block, and the tensors
outside the blocks are read twice more (the written copy and the source), in chunks.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.backends.checkpoint_load import MANIFEST, _assemble, _skeleton, _tied_names, compare_outputs
from secateurs.backends.expert_layout import PerExpertSource
from secateurs.backends.sharded import ShardedSource
from secateurs.errors import VerificationError
from secateurs.passes.hooks import first_tensor

__all__ = ["check_streamed_reload"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


def _loader_model(folder: Path, plain: bool, trust_remote_code: bool) -> tuple[nn.Module, str]:
    from transformers import AutoConfig

    how = "from_pretrained" if plain else "load_pretrained"
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if plain:
            return _skeleton(config, None, meta=True, trust_remote_code=trust_remote_code), how
        manifest = json.loads((folder / MANIFEST).read_text())
        return _assemble(config, manifest, folder, meta=True, trust_remote_code=trust_remote_code), how
    except Exception as exc:  # whatever keeps the loader from building the model means it does not reload
        raise VerificationError(f"the streamed checkpoint does not reload with {how}: {exc}") from exc


def _scalars(mod: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(mod).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, (bool, int, float)) or (  # sizes and constants; names and paths differ
                isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)):
            out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _check_structure(verified: nn.Module, reloaded: nn.Module, written: ShardedSource, blocks: str,
                     how: str) -> None:
    state = {k: tuple(v.shape) for k, v in reloaded.state_dict().items()}
    tied = _tied_names(reloaded)
    missing = sorted(k for k in state if k not in written and k not in tied)
    unexpected = sorted(k for k in written.tensors if k not in state)
    if missing or unexpected:
        raise VerificationError(f"the streamed checkpoint does not reload with {how}: tensors missing from the "
                                f"files {missing[:5]} (they would be initialised at random), stored but not loaded "
                                f"{unexpected[:5]}; nothing was written")
    for name in written.tensors:
        if tuple(written.info(name).shape) != state[name]:
            raise VerificationError(f"the streamed checkpoint does not reload with {how}: '{name}' is stored as "
                                    f"{list(written.info(name).shape)}, the loader builds {list(state[name])}")
    mods = dict(reloaded.named_modules())
    for name, mod in verified.named_modules():
        other = mods.get(name)
        label = name or type(verified).__name__
        if other is None:
            raise VerificationError(f"the model reloaded with {how} has no module '{label}'; nothing was written")
        inside = name == blocks or name.startswith(blocks + ".")  # judged by their outputs on the probe
        theirs = {} if inside else _scalars(other)
        for key, value in _scalars(mod).items():
            if key in theirs and not _same(value, theirs[key]):
                raise VerificationError(
                    f"module '{label}' ({type(mod).__name__}) has {key}={theirs[key]!r} when reloaded with {how}, "
                    f"{value!r} in the verified model: a size-derived constant does not survive saving; nothing "
                    "was written")
        _check_rebuilt(mod, other, label, how)
        bufs = dict(other.named_buffers(recurse=False))
        for key, buf in mod.named_buffers(recurse=False):
            if key in bufs and tuple(bufs[key].shape) != tuple(buf.shape):
                raise VerificationError(f"buffer '{label}.{key}' has shape {list(bufs[key].shape)} when reloaded "
                                        f"with {how}, {list(buf.shape)} in the verified model; nothing was written")


def _check_rebuilt(mod: nn.Module, other: nn.Module, label: str, how: str) -> None:
    """Compare the buffers a loader computes from the config (rotary tables) with the streamed model's.

    Only where the streamed model has their values: it rebuilt the module to run the preamble.
    """
    mine = dict(mod.named_buffers(recurse=False))
    if not mine or any(b.is_meta for b in mine.values()) or any(p is not None for p in other._parameters.values()) \
            or not hasattr(other, "config") or type(other) is not type(mod):
        return
    with torch.device("cpu"):
        rebuilt = type(other)(config=other.config)
    theirs = dict(rebuilt.named_buffers(recurse=False))
    for key, buf in mine.items():
        got = theirs.get(key)
        if got is None or got.shape != buf.shape or not torch.allclose(got.to(buf.dtype), buf, rtol=1e-5, atol=1e-6):
            raise VerificationError(f"buffer '{label}.{key}' ({type(mod).__name__}), which loaders compute from the "
                                    f"config, differs when reloaded with {how}: the written config does not give the "
                                    "verified model; nothing was written")
    for key, value in _scalars(rebuilt).items():
        mine_value = _scalars(mod).get(key)
        if mine_value is not None and not _same(mine_value, value):
            raise VerificationError(f"module '{label}' ({type(mod).__name__}) has {key}={value!r} when reloaded "
                                    f"with {how}, {mine_value!r} in the verified model; nothing was written")


def _rows(pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    for piece in pieces:
        yield piece.reshape(1) if piece.dim() == 0 else piece


def digest(tensor: torch.Tensor) -> int:
    """A CRC-32 of ``tensor``'s bytes (with its dtype and shape): equal digests mean the same stored tensor."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data.data, zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode()))


def _same_rows(want: Iterable[torch.Tensor], got: Iterable[torch.Tensor]) -> bool:
    """Whether two streams of slices along dim 0, cut at different rows, hold the same tensor bit for bit."""
    a_iter, b_iter = _rows(want), _rows(got)
    a = b = None
    while True:
        if a is None or not len(a):
            a = next(a_iter, None)
        if b is None or not len(b):
            b = next(b_iter, None)
        if a is None or b is None:
            return a is None and b is None
        n = min(len(a), len(b))
        if n == 0:
            continue
        if a.dtype != b.dtype or a.shape[1:] != b.shape[1:] or not torch.equal(  # bytes: NaN equals NaN
                a[:n].contiguous().view(torch.uint8), b[:n].contiguous().view(torch.uint8)):
            return False
        a, b = a[n:], b[n:]


def _check_copies(written: ShardedSource, copies: Sequence[tuple[str, Callable[[], Iterable[torch.Tensor]]]],
                  chunk_bytes: int, how: str) -> None:
    for name, pieces in copies:
        if name not in written:
            raise VerificationError(f"'{name}' is missing from the streamed checkpoint; nothing was written")
        if not _same_rows(pieces(), written.chunks(name, chunk_bytes)):
            raise VerificationError(f"'{name}' read back from the streamed checkpoint (as {how} reads it) differs "
                                    "from the source's tensor with the pruned channels removed; nothing was written")


def check_streamed_reload(folder: Path, verified: nn.Module, blocks: str,
                          probes: list[tuple[str, Call, torch.Tensor]], plain: bool, *,
                          copies: Sequence[tuple[str, Callable[[], Iterable[torch.Tensor]]]] = (),
                          chunk_bytes: int = 1 << 28, trust_remote_code: bool = False,
                          per_expert: bool = False, digests: Sequence[dict[str, int]] = ()) -> None:
    """Check the streamed output in ``folder`` as its claimed loader will load it (see the module docstring).

    Args:
        folder: The written (not yet renamed) output.
        verified: The streamed model on ``meta``, with every pruned size applied.
        blocks: The name of its block list.
        probes: For every output block, the probed submodule's name prefix (``""`` for the whole block, ``"mlp."``
            where the model's preamble cannot be rebuilt), the probe call and the output it gave.
        copies: Every tensor written outside the blocks, with the slices (along dim 0) it must hold.
        chunk_bytes: Largest slice of a written tensor read at once.
        plain: The output claims plain ``from_pretrained`` loads it.
        trust_remote_code: Passed to the config loader.
        digests: For every output block, :func:`digest` of each tensor of its state when it was written (block
            names); the tensors read back must have the same bytes (the probe alone does not see an expert it does
            not route to).
        per_expert: The blocks hold their experts one by one; they are read through transformers' conversion into
            the fused layout, as ``from_pretrained`` reads them.

    Raises:
        VerificationError: The reloaded model differs from the streamed one.

    """
    reloaded, how = _loader_model(folder, plain, trust_remote_code)
    written = PerExpertSource(folder, reloaded) if per_expert else ShardedSource(folder)
    _check_structure(verified, reloaded, written, blocks, how)
    for position, (suffix, call, want) in enumerate(probes):
        prefix = f"{blocks}.{position}."
        block = reloaded.get_submodule(f"{blocks}.{position}")
        loaded = written.load([prefix + k for k in block.state_dict()])
        for key, want_digest in (digests[position] if digests else {}).items():
            if prefix + key not in loaded:
                raise VerificationError(f"'{prefix + key}' was verified and written but {how} does not read it")
            if digest(loaded[prefix + key]) != want_digest:
                raise VerificationError(f"'{prefix + key}' reloaded with {how} differs from the tensor that was "
                                        "verified and written")
        block.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, assign=True, strict=True)
        del loaded
        target = block.get_submodule(suffix[:-1]) if suffix else block
        name = prefix + suffix[:-1] if suffix else prefix[:-1]
        if any(t.is_meta for t in target.buffers()):
            raise VerificationError(f"'{name}' reloaded with {how} has buffers no file stores")
        args, kwargs = call
        with torch.no_grad():
            got = first_tensor(target.eval()(*args, **kwargs))
        block.to("meta")
        if got is None:
            raise VerificationError(f"'{name}' reloaded with {how} returns no tensor")
        compare_outputs(want, got, f"'{name}' reloaded with {how}")
    _check_copies(written, copies, chunk_bytes, how)
