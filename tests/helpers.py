"""Shared test helpers: dead-channel construction and output comparison."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

import secateurs as sc
from secateurs.ir import analyze
from secateurs.ir.depgraph import DependencyInfo


def call(model: torch.nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def make_dead(model: torch.nn.Module, inputs: Any, ratio: float, seed: int = 0, hidden: bool = False):
    """Zero every parameter slice of a random ``ratio`` of the channels of every eligible group.

    Returns the dead channel indices per group id and the analysis (of the capture made here).
    """
    graph = sc.capture(model, inputs)
    info = analyze(graph)
    rng = np.random.default_rng(seed)
    dead: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for g in info.iter_groups():
            if g.mixed_at is not None and not hidden:
                continue
            k = min(int(round(g.size * ratio)), g.size - 1)
            if k <= 0:
                continue
            chans = rng.choice(g.size, size=k, replace=False)
            dead[g.id] = np.sort(chans)
            for m in g.members:
                idx = info.channel_positions(m, g.id)
                pos = np.flatnonzero(np.isin(idx, chans))
                owner_path, _, leaf = m.name.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                t = getattr(owner, leaf)
                if m.is_param:
                    t.index_fill_(m.dim, torch.from_numpy(pos), 0.0)
    return dead, info


def dead_importance(dead: dict[int, np.ndarray]):
    """A custom criterion: dead channels score 0, the rest 1 (matched by group size and order)."""
    def crit(graph, info: DependencyInfo, group) -> np.ndarray:
        s = np.ones(group.size)
        # The pruning pass re-analyses the same graph, so group ids are stable between the two analyses.
        if group.id in dead:
            s[dead[group.id]] = 0.0
        return s
    return crit


def clone(model):
    return copy.deepcopy(model)


def run_cli(capsys, *argv: str) -> tuple[Any, dict[str, Any], str]:
    """Run the command line with ``--json``: (exit code, the JSON document or {}, standard error)."""
    import json

    from secateurs.cli import main

    try:
        code = main([*argv, "--json"])
    except SystemExit as exc:  # argparse refused a flag value
        code = exc.code
    out, err = capsys.readouterr()
    if not out.strip():
        return code, {}, err
    try:
        return code, json.loads(out), err
    except ValueError:  # progress or log lines before the document
        return code, json.loads(out.strip().splitlines()[-1]), err
