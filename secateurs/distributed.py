"""Data-parallel calibration with ``torch.distributed``.

Calibration statistics are sums over batches: Wanda input norms, SparseGPT Hessians ``X^T X``, activation
means and variances, Taylor gradient products. When a process group is initialised (the script was started
with ``torchrun``), every rank runs its share of the calibration batches (:func:`shard`: ``calls[rank::world]``)
and the passes sum the partial statistics over the ranks (:func:`all_reduce_sum`). Every rank then holds the
same statistics and takes the same pruning decisions, so the pruned models are identical on all ranks and
equal to a single-process run (up to the order of floating-point additions); only the writer rank
(:func:`is_writer`) should save them. Without a process group (or with one rank) both helpers do nothing, so
the same pass code runs single-process.

Launch (one machine, 8 processes; ``gloo`` on CPU, ``nccl`` on GPUs)::

    torchrun --standalone --nproc_per_node 8 my_prune.py

Several machines (run the same command on each; ``host`` is the first machine)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host:29500 my_prune.py

where ``my_prune.py`` calls :func:`init` first, then ``secateurs.prune(...)`` with ``calib=...``, and saves when
:func:`is_writer`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from secateurs.errors import BudgetError

__all__ = [
    "all_reduce_sum", "barrier", "init", "is_distributed", "is_writer", "presharded", "rank", "shard", "world_size",
]

log = logging.getLogger(__name__)

K = TypeVar("K")
T = TypeVar("T")

# Tensors below this size are concatenated into one buffer per dtype, so a block's many small statistics
# cost one collective; larger ones (Hessians) are reduced in place to avoid a second copy.
_BUCKET_BYTES = 16 << 20
_PRESHARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("secateurs_presharded", default=False)


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """The rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer(writer: int = 0) -> bool:
    """Whether this process should write outputs (checkpoints, reports): rank ``writer``, or any lone process."""
    return rank() == writer


def init(backend: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if there is one.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; by default ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        Whether a process group is initialised now (False when the process was not started by ``torchrun``).

    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)
    return True


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def shard(calls: Sequence[T]) -> list[T]:
    """The share of the calibration calls this rank runs: ``calls[rank::world]`` (all of them single-process).

    A rank may get none when there are fewer calls than ranks; :func:`all_reduce_sum` still works then.
    Inside :func:`presharded` the calls are already this rank's own and come back unchanged.
    """
    if not is_distributed() or _PRESHARDED.get():
        return list(calls)
    return list(calls[rank()::world_size()])


@contextlib.contextmanager
def presharded() -> Iterator[None]:
    """Within the body, :func:`shard` keeps every call: the caller already split the data by rank.

    Streaming pruning shards the calibration batches once and carries each rank's activations from block to
    block; the passes it runs on a block must use all of them.
    """
    token = _PRESHARDED.set(True)
    try:
        yield
    finally:
        _PRESHARDED.reset(token)


def _spec(value: Any, key: Any) -> tuple[str, tuple[int, ...], str]:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            raise BudgetError(f"cannot sum the boolean statistic {key!r} over ranks")
        return "tensor", tuple(value.shape), str(value.dtype).removeprefix("torch.")
    if isinstance(value, np.ndarray):
        return "numpy", tuple(value.shape), str(value.dtype)
    if isinstance(value, (bool, np.bool_)):
        raise BudgetError(f"cannot sum the boolean statistic {key!r} over ranks")
    if isinstance(value, (int, np.integer)):
        return "int", (), "int64"
    if isinstance(value, (float, np.floating)):
        return "float", (), "float64"
    raise BudgetError(f"cannot sum the statistic {key!r} of type {type(value).__name__} over ranks")


def _as_tensor(value: Any, spec: tuple[str, tuple[int, ...], str]) -> torch.Tensor:
    kind, shape, dtype = spec
    if value is None:
        if kind == "numpy":
            return torch.from_numpy(np.zeros(shape, dtype=dtype))
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    if kind == "tensor":
        return value.detach()  # type: ignore[no-any-return]
    if kind == "numpy":
        return torch.from_numpy(np.ascontiguousarray(value))
    return torch.tensor(value, dtype=getattr(torch, dtype))


def _back(t: torch.Tensor, spec: tuple[str, tuple[int, ...], str], like: Any) -> Any:
    kind = spec[0]
    if kind == "tensor":
        device = like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
        return t.to(device)
    if kind == "numpy":
        return t.cpu().numpy()
    return int(t.item()) if kind == "int" else float(t.item())


def all_reduce_sum(values: Mapping[K, Any], *, inplace: bool = False) -> dict[K, Any]:
    """Sum ``values`` over all ranks; every rank gets the same sums back (a copy of ``values`` single-process).

    Values are tensors, NumPy arrays or Python numbers; each comes back as the same kind (tensors on their
    device). Keys missing on a rank (it ran no calibration call that reached that layer) count as zeros, so
    the key sets may differ; every rank must call this the same number of times, in the same order.

    Args:
        values: The partial sums of this rank.
        inplace: Allow large tensors of ``values`` to be overwritten with the sums instead of copied first
            (saves one copy of each Hessian when the caller discards its partial sums anyway).

    Raises:
        BudgetError: A value cannot be summed, or the ranks disagree on a statistic's shape or dtype.

    """
    if not is_distributed():
        return dict(values)
    local = {k: _spec(v, k) for k, v in values.items()}
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    specs: dict[Any, tuple[str, tuple[int, ...], str]] = {}
    for r, theirs in enumerate(gathered):
        for k, s in theirs.items():
            if specs.setdefault(k, s) != s:
                raise BudgetError(f"statistic {k!r} differs between ranks: {specs[k]} vs {s} on rank {r}")
    keys = sorted(specs, key=repr)
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else None
    tensors: dict[Any, torch.Tensor] = {}
    for k in keys:
        t = _as_tensor(values.get(k), specs[k])
        big = t.numel() * t.element_size() >= _BUCKET_BYTES
        if device is not None and t.device != device:
            t = t.to(device)
        elif big and k in values and not inplace:
            t = t.clone()  # large tensors are reduced in place: not the caller's unless allowed
        tensors[k] = t.contiguous()
    small: dict[torch.dtype, list[Any]] = {}
    for k in keys:
        t = tensors[k]
        if t.numel() * t.element_size() >= _BUCKET_BYTES:
            dist.all_reduce(t)
        else:
            small.setdefault(t.dtype, []).append(k)
    for group in small.values():
        flat = torch.cat([tensors[k].reshape(-1) for k in group])
        dist.all_reduce(flat)
        offset = 0
        for k in group:
            n = tensors[k].numel()
            tensors[k] = flat[offset:offset + n].reshape(tensors[k].shape)
            offset += n
    return {k: _back(tensors[k], specs[k], values.get(k)) for k in keys}
