"""Benchmark: width budget allocators in one run, Týr's search against uniform and every existing allocator.

The models and quality measures of ``bench_allocate_sparsity.py`` (the tiny character Llama: held-out
perplexity; all-MiniLM-L6-v2: cosine to the dense sentence embeddings on held-out documentation), no recovery
training. Budgets: 30% and 50% of the parameters of the FFN and attention-head groups (``ffn=r, heads=r`` with
``budget_unit="params"``; the embeddings and norms are not in the budget); the width criterion is the default
with calibration data (``flap`` with bias compensation); ``round_to=1``, so every allocator spends the same
budget (with the default multiples of 8 the tiny model's small groups round to quite different sizes).
Rows: the uniform plan (no allocator), ``global``, ``lamp``, ``owl``, ``dp``, ``ecoflap``, ``cfsp`` and
``tyr``, each with the parameters left and its wall time.

Usage::

    python benchmarks/bench_allocate_width.py [--threads 2] [--model lm|minilm]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "benchmarks")]

from bench_allocate_sparsity import _minilm, _tiny_lm  # noqa: E402

import secateurs as sc  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("secateurs").setLevel(logging.ERROR)

ALLOCATORS = (None, "global", "lamp", "owl", "dp", "ecoflap", "cfsp", "tyr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("lm", "minilm"), action="append", help="default: both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; no recovery training\n")
    for which in args.model or ["lm", "minilm"]:
        torch.manual_seed(0)
        dense, example, calib, quality, what = _tiny_lm() if which == "lm" else _minilm()
        name = "tiny Llama LM" if which == "lm" else "all-MiniLM-L6-v2"
        print(f"{name} ({sum(p.numel() for p in dense.parameters()):,} parameters): {what}; dense "
              f"{quality(dense):.4f}")
        print(f"{'allocator':<10} {'30%':>8} {'params':>10} {'s':>6} {'50%':>8} {'params':>10} {'s':>6}")
        for allocator in ALLOCATORS:
            cells = []
            for ratio in (0.3, 0.5):
                model = copy.deepcopy(dense)
                kw = {"allocate": allocator, "budget_unit": "params"} if allocator else {}
                start = time.perf_counter()
                report = sc.prune(model, example, calib=calib, ffn=ratio, heads=ratio, round_to=1, **kw)
                seconds = time.perf_counter() - start
                cells += [f"{quality(model):.4f}", f"{report.params_after:,}", f"{seconds:.1f}"]
            print(f"{allocator or 'uniform':<10} {cells[0]:>8} {cells[1]:>10} {cells[2]:>6} {cells[3]:>8} "
                  f"{cells[4]:>10} {cells[5]:>6}", flush=True)
        print()


if __name__ == "__main__":
    main()
