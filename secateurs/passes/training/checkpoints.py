"""Resumable recovery checkpoints: trainable tensors, optimizer moments and random state, never pickled."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.errors import CheckpointError
from secateurs.passes.training.options import _FORMAT, LossPoint
from secateurs.passes.training.teacher import _save_tensors, _write_atomic

log = logging.getLogger("secateurs.passes.distill")  # one logger for recovery (the CLI sets its level)


@dataclasses.dataclass
class _State:
    step: int = 0
    curve: list[LossPoint] = dataclasses.field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    best: dict[str, torch.Tensor] | None = None


def _state_tensors(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """What training changes: the trained parameters and every floating-point buffer (norm statistics)."""
    out: dict[str, torch.Tensor] = dict(trainable)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not name.endswith("_mask"):
            out[name] = buf
    return out


class _Checkpoints:
    """Resumable training state in ``folder``: ``step-NNNNNNNN/`` folders and a ``latest.json`` pointer."""

    def __init__(self, folder: Path, mode: str) -> None:
        self.folder, self.mode = folder, mode

    def save(self, model: nn.Module, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             state: _State, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{n}": t for n, t in _state_tensors(model, trainable).items()}
        names = list(trainable)
        opt_state = optimizer.state_dict()
        for idx, slots in opt_state["state"].items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{names[idx]}.{key}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        if state.best is not None:
            tensors.update({f"best.{n}": t for n, t in state.best.items()})
        scalars = {
            "format": _FORMAT, "mode": self.mode, "step": state.step, "seconds": seconds,
            "best_loss": state.best_loss, "best_step": state.best_step, "bad_evals": state.bad_evals,
            "stopped_early": state.stopped_early, "trainable": {n: list(p.shape) for n, p in trainable.items()},
            "curve": [dataclasses.asdict(p) for p in state.curve],
            "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]],
        }
        final = self.folder / f"step-{state.step:08d}"
        tmp = self.folder / f".step-{state.step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_tensors(tensors, tmp / "state.safetensors")
        _write_atomic(tmp / "state.json", json.dumps(scalars, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(self.folder / "latest.json", json.dumps({"checkpoint": final.name, "step": state.step}))
        for old in self.folder.glob("step-*"):
            if old != final and re.fullmatch(r"step-\d{8}", old.name):
                shutil.rmtree(old, ignore_errors=True)

    def load(self, model: nn.Module, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             state: _State, device: torch.device) -> int | None:
        """Restore the latest checkpoint into the model, optimizer and ``state``; its step, or None if none."""
        pointer = self.folder / "latest.json"
        if not pointer.exists():
            log.info("no recovery checkpoint in '%s'; starting from step 0", self.folder)
            return None
        try:
            folder = self.folder / json.loads(pointer.read_text())["checkpoint"]
            scalars = json.loads((folder / "state.json").read_text())
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "state.safetensors"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read recovery checkpoint in '{self.folder}': {exc}") from exc
        if scalars.get("format") != _FORMAT or scalars.get("mode") != self.mode:
            raise CheckpointError(f"recovery checkpoint '{folder}' was written in mode {scalars.get('mode')!r}, "
                                  f"this run is {self.mode!r}")
        want = {n: list(p.shape) for n, p in trainable.items()}
        if scalars.get("trainable") != want:
            diff = sorted(set(map(str, scalars.get("trainable", {}).items())) ^ set(map(str, want.items())))[:3]
            raise CheckpointError(f"recovery checkpoint '{folder}' belongs to another model: {diff}")
        with torch.no_grad():
            for name, current in _state_tensors(model, trainable).items():
                key = f"model.{name}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(current.shape):
                    raise CheckpointError(f"recovery checkpoint '{folder}' lacks tensor '{name}' of shape "
                                          f"{tuple(current.shape)}")
                current.copy_(tensors[key])
        names = list(trainable)
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                name, _, slot = key[len("optim."):].rpartition(".")
                if name not in trainable:
                    raise CheckpointError(f"recovery checkpoint '{folder}' has optimizer state for unknown '{name}'")
                slots.setdefault(names.index(name), {})[slot] = value.to(device)
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, scalars["optimizer_groups"], strict=False):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        state.step, state.seconds = int(scalars["step"]), float(scalars["seconds"])
        state.best_loss, state.best_step = scalars["best_loss"], scalars["best_step"]
        state.bad_evals, state.stopped_early = int(scalars["bad_evals"]), bool(scalars["stopped_early"])
        state.curve = [LossPoint(**p) for p in scalars["curve"]]
        state.best = best or None
        return state.step
