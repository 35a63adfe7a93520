"""Benchmark: the time of one pruning call, secateurs against Torch-Pruning, on the coverage zoo and real-size models.

    python benchmarks/bench_speed.py                      # every family of tests/families.py
    python benchmarks/bench_speed.py bert tv_densenet121  # some
    python benchmarks/bench_speed.py --full               # ResNet-50, ViT-B/16, DenseNet-121, BERT-base, a 1B Llama
    python benchmarks/bench_speed.py --profile            # where secateurs' time goes, phase by phase

Per model, in one process and interleaved (Torch-Pruning, secateurs, Torch-Pruning, ...), each call on a fresh
``copy.deepcopy`` of one seeded model, the minimum of ``--repeat`` calls kept:

* secateurs: ``secateurs.prune(model, inputs, ratio=0.3)`` with its defaults: capture, dependency analysis,
  scoring, the plan, the rewrite and its verification (the cheap check: one forward of the pruned model replayed
  against the dense recording, every traced shape against the plan, the outputs against the masked dense model;
  node by node on any doubt), the report and the final output check;
* Torch-Pruning: the harness of ``tools/torch_pruning_zoo.py`` (``BasePruner`` with ``GroupMagnitudeImportance``,
  heads given as its examples give them, the output layer ignored), graph build + ``pruner.step()``; it verifies
  nothing.

A call that raises or runs past ``--timeout`` (SIGALRM, default 60 s) counts as a failure of that tool, which is
then not called again on that model. The table prints both
times and their ratio (secateurs / Torch-Pruning, below 1 means secateurs is faster); the summary the median and
geometric mean of the ratios over the models both tools prune, and the largest. ``--profile`` splits
secateurs' time into capture, analysis, scoring, planning, rewrite, verification, report (per-layer costs and the
output drift) and the rest (pass manager, invariant checks, the report itself).
Only the CPU is used, with ``--threads`` torch threads (default 1). ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

import secateurs as sc  # noqa: E402

from families import FAMILIES, _call, build  # noqa: E402

RATIO = 0.3


def _full_models() -> dict[str, Callable[[], tuple[nn.Module, Any]]]:
    """Real-size models with random weights (built from configs: nothing is downloaded)."""
    import transformers as tf

    def bert_base() -> tuple[nn.Module, Any]:
        model = tf.BertModel(tf.BertConfig())
        return model, {"input_ids": torch.randint(0, 30522, (1, 128)), "attention_mask": torch.ones(1, 128, dtype=torch.long)}

    def llama_1b() -> tuple[nn.Module, Any]:  # Llama-3.2-1B's shape
        cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
        return tf.LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 128256, (1, 32))}

    out: dict[str, Callable[[], tuple[nn.Module, Any]]] = {"bert_base": bert_base, "llama_1b": llama_1b}
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        def tv(name: str) -> Callable[[], tuple[nn.Module, Any]]:
            return lambda: (getattr(torchvision.models, name)(), (torch.randn(1, 3, 224, 224),))

        out.update({"resnet50": tv("resnet50"), "vit_b_16": tv("vit_b_16"), "densenet121": tv("densenet121")})
    return out


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def alarm(_signum: int, _frame: Any) -> None:
        raise _Timeout(f"no result in {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _secateurs(model: nn.Module, inputs: Any) -> None:
    sc.prune(model, inputs, ratio=RATIO)


def _torch_pruning(model: nn.Module, inputs: Any) -> None:
    from torch_pruning_zoo import _prune

    _prune(model, inputs, RATIO)


def _timed(tool: Callable[[nn.Module, Any], None], model: nn.Module, inputs: Any, timeout: float) -> float | str:
    """Seconds of one call on a copy of ``model``, or the failure's first line."""
    work = copy.deepcopy(model)
    try:
        with _deadline(timeout):
            start = time.perf_counter()
            tool(work, inputs)
            return time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a failure is a table cell
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:70] if text else ''}"


PHASES = {
    "capture": [("secateurs.frontends.torch_export", "capture_call")],
    "analysis": [("secateurs.passes.dependencies", "AnalyzeDependencies.run")],
    "scoring": [("secateurs.passes.importance", "ScoreChannels.run")],
    "planning": [("secateurs.passes.channels", "plan_keep"), ("secateurs.passes.channels", "predict_cost")],
    "rewrite": [("secateurs.passes.channels", "apply_keep"), ("secateurs.passes.channels", "compensate_biases")],
    "verification": [("secateurs.passes.channels", "PruneChannels._verify")],
    "report": [("secateurs.api", "costs_by_layer"), ("secateurs.api", "measure_drift")],
}
"""Phase -> the functions whose time it is (capture inside verification counts as verification)."""


@contextlib.contextmanager
def _phase_clock(spent: dict[str, float]) -> Iterator[None]:
    """Time the functions of :data:`PHASES` (outermost phase only) while the block runs."""
    active: list[str] = []
    patched: list[tuple[Any, str, Any]] = []

    def wrap(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if active:
                return fn(*args, **kwargs)
            active.append(phase)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - start
                active.pop()
        return timed

    import importlib

    for phase, targets in PHASES.items():
        for mod_name, attr in targets:
            owner: Any = importlib.import_module(mod_name)
            *path, leaf = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            if not hasattr(owner, leaf):
                continue
            patched.append((owner, leaf, getattr(owner, leaf)))
            setattr(owner, leaf, wrap(phase, getattr(owner, leaf)))
    try:
        yield
    finally:
        for owner, leaf, fn in reversed(patched):
            setattr(owner, leaf, fn)


def _profile(model: nn.Module, inputs: Any, repeat: int) -> dict[str, float]:
    """The phases of the fastest of ``repeat`` secateurs calls (seconds), with ``total`` and ``other``."""
    best: dict[str, float] | None = None
    for _ in range(repeat):
        spent: dict[str, float] = {}
        work = copy.deepcopy(model)
        with _phase_clock(spent):
            start = time.perf_counter()
            _secateurs(work, inputs)
            spent["total"] = time.perf_counter() - start
        if best is None or spent["total"] < best["total"]:
            best = spent
    assert best is not None
    best["other"] = best["total"] - sum(v for k, v in best.items() if k != "total")
    return best


def _cell(value: float | str | None) -> str:
    return f"{value:8.3f}" if isinstance(value, float) else "       -"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to run (default: the whole zoo, or --full)")
    parser.add_argument("--full", action="store_true", help="the real-size models instead of the zoo")
    parser.add_argument("--repeat", type=int, default=3, help="calls per tool per model, the fastest kept")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a call counts as failed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--profile", action="store_true", help="split secateurs' time into its phases")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("secateurs").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    peer = importlib.util.find_spec("torch_pruning") is not None
    if not peer and not args.profile:
        print("torch-pruning is not installed (pip install -e '.[bench]'): secateurs' times only", file=sys.stderr)
    builders: dict[str, Callable[[], tuple[nn.Module, Any]]]
    if args.full:
        builders = _full_models()
    else:
        builders = {n: functools.partial(build, n) for n, f in FAMILIES.items()
                    if f.source not in ("torchvision", "timm") or importlib.util.find_spec(f.source) is not None}
    names = args.names or list(builders)
    rows: list[dict[str, Any]] = []
    if args.profile:
        print(f"{'model':20s} {'total':>8s} " + " ".join(f"{p:>12s}" for p in [*PHASES, "other"]))
    else:
        print(f"{'model':20s} {'secateurs':>9s} {'torch-pr.':>9s} {'ratio':>7s}  note")
    for name in names:
        torch.manual_seed(0)
        model, inputs = builders[name]()
        model.eval()
        _call(model, inputs)
        if args.profile:
            spent = _profile(model, inputs, args.repeat)
            rows.append({"model": name, **spent})
            print(f"{name:20s} {spent['total']:8.3f} " + " ".join(
                f"{spent.get(p, 0.0):7.3f} {100 * spent.get(p, 0.0) / spent['total']:3.0f}%" for p in [*PHASES, "other"]),
                flush=True)
            continue
        ours: list[float | str] = []
        theirs: list[float | str] = []
        for _ in range(args.repeat):  # a tool that failed once is not called again on this model
            if peer and not any(isinstance(t, str) for t in theirs):
                theirs.append(_timed(_torch_pruning, model, inputs, args.timeout))
            if not any(isinstance(t, str) for t in ours):
                ours.append(_timed(_secateurs, model, inputs, args.timeout))
        sc_t = min((t for t in ours if isinstance(t, float)), default=None)
        tp_t = min((t for t in theirs if isinstance(t, float)), default=None)
        ratio = sc_t / tp_t if sc_t is not None and tp_t is not None and tp_t > 0 else None
        note = "; ".join(f"{tool}: {t}" for tool, ts in (("secateurs", ours), ("torch-pruning", theirs))
                         for t in ts[:1] if isinstance(t, str))
        rows.append({"model": name, "secateurs_s": sc_t, "torch_pruning_s": tp_t, "ratio": ratio, "note": note})
        print(f"{name:20s} {_cell(sc_t)}  {_cell(tp_t)} {f'{ratio:7.2f}' if ratio else '      -'}  {note}", flush=True)
    if args.profile:
        total = sum(r["total"] for r in rows)
        print(f"{'all':20s} {total:8.3f} " + " ".join(
            f"{sum(r.get(p, 0.0) for r in rows):7.3f} {100 * sum(r.get(p, 0.0) for r in rows) / total:3.0f}%"
            for p in [*PHASES, "other"]))
    else:
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        ok_sc = sum(r["secateurs_s"] is not None for r in rows)
        ok_tp = sum(r["torch_pruning_s"] is not None for r in rows)
        print(f"\nsecateurs returned on {ok_sc}/{len(rows)}, Torch-Pruning on {ok_tp}/{len(rows)}")
        if ratios:
            worst = max(rows, key=lambda r: r["ratio"] or 0.0)
            print(f"time ratio secateurs / Torch-Pruning over the {len(ratios)} models both prune: median "
                  f"{statistics.median(ratios):.2f}x, geometric mean {math.exp(statistics.fmean(map(math.log, ratios))):.2f}x, "
                  f"largest {worst['ratio']:.2f}x ({worst['model']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
