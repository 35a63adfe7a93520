"""Torch-Pruning on the coverage zoo (``tests/families.py``), set up the way its own examples set it up.

    python tools/torch_pruning_zoo.py            # every family, a table row each
    python tools/torch_pruning_zoo.py vit bert   # some
    python tools/zoo.py --torch-pruning          # the coverage table (docs/coverage.md) with a Torch-Pruning column

Needs the ``[bench]`` extra (``torch-pruning``). One harness for every family, written the way Torch-Pruning's
examples (``examples/transformers``, ``examples/LLMs/prune_llm.py``, ``examples/timm_models``,
``examples/torchvision_models``) prune a model by hand:

- ``BasePruner`` with ``GroupMagnitudeImportance`` (L2), ``pruning_ratio=0.3``, ``global_pruning=False``;
- the output layer ignored: the last Linear / Conv / norm / embedding whose output has the model's output shape
  (the examples name ``lm_head``, ``head``, ``classifier``, ``pooler`` by hand);
- attention projections given to ``num_heads`` with ``prune_num_heads=True, prune_head_dims=False,
  head_pruning_ratio=0.3`` (``q/k/v_proj``, ``query/key/value``, timm's fused ``qkv``, ``in_proj`` of
  ``nn.MultiheadAttention``);
- after ``pruner.step()``, the head counts and widths the forward reads re-set on each attention module from
  ``pruner.num_heads`` and the projections' sizes, as every example does by hand after pruning.

The oracles are the zoo's: bit-identical at ratio 0; at ratio 0.3 the model runs, keeps its output shape and
loses at least 5% of its parameters. Torch-Pruning has no check that the pruned model computes what the plan
meant, so "runs" is all that can be asked of it; secateurs' rows also pass ONNX Runtime parity and reload.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
import traceback
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import FAMILIES, _call, _output, build  # noqa: E402

RATIO = 0.3
TIMEOUT = 60.0
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding, nn.GroupNorm,
           nn.modules.batchnorm._BatchNorm)


@dataclasses.dataclass
class PeerOutcome:
    """What the zoo's oracles found for Torch-Pruning on one family."""

    name: str
    removed: float = 0.0
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        """A table cell: the parameters removed, or the first problem."""
        if self.problems:
            return f"fails: {self.problems[0][:80]}"
        return f"{100 * self.removed:.1f}%"


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _attr(mod: Any, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(mod, name, None)
        if isinstance(value, int) and value > 0:
            return name, value
    config = getattr(mod, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return name, value
    return None


def _heads(model: nn.Module) -> tuple[dict[nn.Module, int], list[tuple[nn.Module, dict[str, nn.Module]]]]:
    """``num_heads`` for the pruner, and each attention module with the projections its counts come from."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    num_heads: dict[nn.Module, int] = {}
    blocks = []
    for mod in model.modules():
        if isinstance(mod, nn.MultiheadAttention):
            num_heads[mod] = mod.num_heads
            blocks.append((mod, {"mha": mod}))
            continue
        q = next((getattr(mod, n) for n in ("q_proj", "query", "q_lin", "q") if isinstance(getattr(mod, n, None), nn.Linear)),
                 None)
        k = next((getattr(mod, n) for n in ("k_proj", "key", "k_lin", "k") if isinstance(getattr(mod, n, None), nn.Linear)),
                 None)
        v = next((getattr(mod, n) for n in ("v_proj", "value", "v_lin", "v") if isinstance(getattr(mod, n, None), nn.Linear)),
                 None)
        fused = next((getattr(mod, n) for n in ("qkv", "qkv_proj", "Wqkv", "c_attn", "query_key_value")
                      if isinstance(getattr(mod, n, None), nn.Linear)), None)
        heads = _attr(mod, _HEAD_ATTRS) or _attr(text, ("num_attention_heads",))
        if heads is None:
            continue
        kv = _attr(mod, _KV_ATTRS) or _attr(text, ("num_key_value_heads",)) or heads
        if q is not None and k is not None and v is not None:
            num_heads[q] = heads[1]
            num_heads[k] = num_heads[v] = kv[1]
            blocks.append((mod, {"q": q, "k": k, "v": v}))
        elif isinstance(fused, nn.Linear):
            num_heads[fused] = heads[1]
            blocks.append((mod, {"qkv": fused}))
    return num_heads, blocks


def _sync(pruner: Any, blocks: list[tuple[nn.Module, dict[str, nn.Module]]]) -> None:
    """Re-set what each attention forward reads, as Torch-Pruning's examples do after ``pruner.step()``."""
    for mod, proj in blocks:
        if "mha" in proj:
            continue  # Torch-Pruning's own MultiheadAttention pruner updates the module
        first = proj.get("q") or proj["qkv"]
        heads = pruner.num_heads.get(first)
        if heads is None:
            continue
        width = first.out_features // (3 if "qkv" in proj else 1)
        for name in _HEAD_ATTRS:
            if isinstance(getattr(mod, name, None), int):
                setattr(mod, name, heads)
        if "k" in proj:
            kv = pruner.num_heads.get(proj["k"], heads)
            for name in _KV_ATTRS:
                if isinstance(getattr(mod, name, None), int):
                    setattr(mod, name, kv)
            if isinstance(getattr(mod, "num_key_value_groups", None), int):
                mod.num_key_value_groups = heads // kv
        for name in ("all_head_size", "attn_dim", "inner_dim"):
            if isinstance(getattr(mod, name, None), int):
                setattr(mod, name, width)


def _output_layers(model: nn.Module, inputs: Any, ref: torch.Tensor) -> list[nn.Module]:
    """The output layer, which the examples list as ignored by hand.

    The last module whose output has the model's output shape, else the last Linear / Conv that ran (a
    segmentation head upsampled afterwards).
    """
    same: list[nn.Module] = []
    ran: list[nn.Module] = []

    def hook(mod: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.shape == ref.shape:
            same.append(mod)
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            ran.append(mod)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LEAVES)]
    try:
        _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return (same or ran)[-1:]


def _prune(model: nn.Module, inputs: Any, ratio: float) -> None:
    import torch_pruning as tp

    ref = _call(model, inputs)
    num_heads, blocks = _heads(model)
    pruner = tp.pruner.BasePruner(
        model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=False, ignored_layers=_output_layers(model, inputs, ref), num_heads=num_heads,
        prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=ratio if num_heads else 0.0,
        output_transform=_output)
    pruner.step()
    _sync(pruner, blocks)


def check_peer(name: str, verbose: bool = False) -> PeerOutcome:
    """Torch-Pruning on family ``name`` under the zoo's oracles (see the module docstring)."""
    result = PeerOutcome(name)
    start = time.perf_counter()
    try:
        model, inputs = build(name)
        ref = _call(model, inputs)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        _prune(model, inputs, 0.0)
        if not torch.equal(_call(model, inputs), ref) or state.keys() != model.state_dict().keys() or any(
                not torch.equal(v, state[k]) for k, v in model.state_dict().items()):
            result.problems.append("ratio 0 is not bit-identical")
        model, inputs = build(name)
        before = _count(model)
        _prune(model, inputs, RATIO)
        out = _call(model, inputs)
        result.removed = 1 - _count(model) / before
        if out.shape != ref.shape:
            result.problems.append(f"output shape {tuple(out.shape)} != {tuple(ref.shape)}")
        if result.removed < 0.05:
            result.problems.append(f"only {100 * result.removed:.1f}% of the parameters removed")
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a table row
        if verbose:
            traceback.print_exc()
        result.problems.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if str(exc)
                               else type(exc).__name__)
    result.seconds = time.perf_counter() - start
    return result


def run_peer(name: str, timeout: float = TIMEOUT, verbose: bool = False) -> PeerOutcome:
    """:func:`check_peer` in a child process, given up after ``timeout`` seconds (Torch-Pruning's group search
    does not finish on some graphs)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name, *(["-v"] if verbose else [])],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return PeerOutcome(name, seconds=timeout, problems=[f"no result in {timeout:.0f} s"])
    if verbose:
        print(done.stderr, file=sys.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:100]
        return PeerOutcome(name, seconds=time.perf_counter() - start, problems=[f"crashed: {tail}"])
    return PeerOutcome(**json.loads(lines[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="families to run (default: all)")
    parser.add_argument("-v", action="store_true", help="print tracebacks")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process of run_peer
    args = parser.parse_args()
    if args.one:
        warnings.filterwarnings("ignore")
        print(json.dumps(dataclasses.asdict(check_peer(args.one, verbose=args.v))))
        return 0
    if importlib.util.find_spec("torch_pruning") is None:
        print("torch-pruning is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    passed = ran = 0
    print(f"| family | Torch-Pruning {version('torch-pruning')} at ratio {RATIO} | s |")
    print("|---|---|---|")
    for name in args.names or list(FAMILIES):
        fam = FAMILIES[name]
        if fam.source in ("torchvision", "timm") and importlib.util.find_spec(fam.source) is None:
            continue
        out = run_peer(name, verbose=args.v)
        ran += 1
        passed += not out.problems
        print(f"| {name} | {out.verdict} | {out.seconds:.1f} |", flush=True)
    print(f"\nTorch-Pruning passed {passed} of {ran}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
