"""The teacher's outputs during recovery: computed on the fly or cached once into safetensors shards."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.errors import RecoveryError
from secateurs.frontends.torch_export import split_inputs
from secateurs.passes.training.losses import _hidden, _main
from secateurs.passes.training.options import _FORMAT, _SHARD
from secateurs.progress import track


def _device(model: nn.Module, default: torch.device) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else default


def _to(value: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


def _indexed(data: Any) -> Sequence[Any]:
    """``data`` itself when it has a length and integer indexing (read lazily), else its items in a list."""
    iterable_only = isinstance(data, torch.utils.data.IterableDataset)  # has __getitem__, which raises
    if not iterable_only and not isinstance(data, (dict, str, bytes)) and hasattr(data, "__len__") and \
            hasattr(data, "__getitem__"):
        return data  # type: ignore[no-any-return]
    return list(data)


def _fingerprint(batches: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for i in range(len(batches)):
        for leaf in torch.utils._pytree.tree_leaves(batches[i]):
            if isinstance(leaf, torch.Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}{float(p.double().abs().sum()):.10e}"
                     .encode())
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    # copies: safetensors refuses tensors that share storage, and the model keeps training meanwhile
    save_file({k: (v.detach().cpu() if v.is_cuda else v.detach().clone()).contiguous() for k, v in tensors.items()},
              str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class _Target:
    main: torch.Tensor
    hidden: dict[int, torch.Tensor]
    index: torch.Tensor | None = None  # token ids of ``main`` when it holds only the top-k logits


class _Teacher:
    """Teacher outputs per batch: computed live, or read from a safetensors cache built once."""

    def __init__(self, teacher: nn.Module | None, kind: str, hidden: list[int], device: torch.device,
                 autocast: Callable[[], Any], top_k: int | None = None) -> None:
        self.teacher, self.kind, self.hidden, self.device, self.autocast = teacher, kind, hidden, device, autocast
        self.top_k = top_k if kind == "kl" else None
        self.cache: Path | None = None
        self._open: dict[Path, Any] = {}

    def compute(self, batch: Any) -> _Target:
        if self.teacher is None:
            raise RecoveryError("the teacher is needed (no usable teacher cache); pass the dense model")
        args, kwargs = split_inputs(self.teacher, batch)
        kwargs.pop("labels", None)
        if self.hidden:
            kwargs["output_hidden_states"] = True
        where = _device(self.teacher, self.device)
        with torch.no_grad(), self.autocast():
            out = self.teacher(*_to(args, where), **_to(kwargs, where))
        hs = _hidden(out) if self.hidden else ()
        for i in self.hidden:
            if i >= len(hs):
                raise RecoveryError(f"teacher layer {i - 1} is out of range: the teacher returns {len(hs)} hidden states")
        return _Target(_main(out, self.kind).detach().to(self.device),
                       {i: hs[i].detach().to(self.device) for i in self.hidden})

    def get(self, split: str, index: int, batch: Any) -> _Target:
        if self.cache is None:
            return self.compute(batch)
        from safetensors import safe_open

        path = self.cache / f"{split}-{index // _SHARD:05d}.safetensors"
        handle = self._open.get(path)
        if handle is None:
            handle = self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        main = handle.get_tensor(f"{index}.main").to(self.device)
        ids = handle.get_tensor(f"{index}.index").to(self.device) if self.top_k is not None else None
        return _Target(main, {i: handle.get_tensor(f"{index}.hidden.{i}").to(self.device) for i in self.hidden}, ids)

    def build_cache(self, folder: Path, splits: dict[str, Sequence[Any]], teacher_layers: int | None) -> None:
        """Reuse the cache in ``folder`` when it matches these batches and this teacher, else (re)build it."""
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "manifest.json"
        want = {"format": _FORMAT, "kind": self.kind, "hidden": self.hidden, "top_k": self.top_k,
                "batches": {s: [len(b), _fingerprint(b)] for s, b in splits.items()}}
        if self.teacher is not None:
            want["teacher"] = _model_fingerprint(self.teacher)
        try:
            have = json.loads(manifest.read_text())
        except (OSError, ValueError):
            have = None
        usable = have is not None and all(have.get(k) == v for k, v in want.items() if k != "teacher") and \
            (self.teacher is None or have.get("teacher") == want["teacher"])
        if not usable:
            if self.teacher is None:
                raise RecoveryError(f"teacher cache '{folder}' is missing or was built for other data; "
                                    "pass the teacher to build it")
            manifest.unlink(missing_ok=True)
            home = _device(self.teacher, self.device)
            self.teacher.to(self.device)
            try:
                for split, batches in splits.items():
                    for start in track(range(0, len(batches), _SHARD), f"teacher cache ({split})"):
                        shard: dict[str, torch.Tensor] = {}
                        for i in range(start, min(start + _SHARD, len(batches))):
                            target = self.compute(batches[i])
                            if self.top_k is not None and self.top_k < target.main.shape[-1]:
                                top = target.main.topk(self.top_k, dim=-1)
                                shard[f"{i}.main"] = top.values.contiguous()
                                shard[f"{i}.index"] = top.indices.to(torch.int32).contiguous()
                            elif self.top_k is not None:
                                shard[f"{i}.main"] = target.main
                                shard[f"{i}.index"] = torch.arange(target.main.shape[-1], dtype=torch.int32) \
                                    .expand_as(target.main).contiguous()
                            else:
                                shard[f"{i}.main"] = target.main
                            shard.update({f"{i}.hidden.{j}": t for j, t in target.hidden.items()})
                        _save_tensors(shard, folder / f"{split}-{start // _SHARD:05d}.safetensors")
            finally:
                self.teacher.to(home)
            _write_atomic(manifest, json.dumps({**want, "teacher_layers": teacher_layers}))
        self.cache = folder
        self.teacher = None  # the teacher is no longer needed


# ---------------------------------------------------------------------------------------------- the pass
