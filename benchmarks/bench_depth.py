"""Benchmark: depth pruning and budget allocators on the real all-MiniLM-L6-v2 (no recovery training).

Measures, in one run on the same model and text:

* depth: removing 1, 2 and 3 of the 6 encoder layers chosen by each criterion (``bi`` block influence,
  ``angular`` distance of consecutive blocks, ``greedy`` output change) and, as the baseline, the last layers;
* width allocation: a 30% FLOPs budget over the FFN neurons and attention heads spent by each allocator
  (``global``, ``lamp``, ``owl``, ``dp``) against uniform allocation (every group loses the same fraction,
  searched to the same FLOPs), all with the ``activation`` criterion.

Quality: mean cosine of mean-pooled embeddings to the dense model on 64 held-out documentation paragraphs
(calibration uses 32 others) and top-1 retrieval over the pydoc topics (see ``bench_minilm.py``). Results go
to ``benchmarks/results/depth.json`` and ``benchmarks/results/depth.png``.

Usage::

    python benchmarks/bench_depth.py [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_minilm import EvalSet, embed, evaluate, retrieval_set, tokenize  # noqa: E402

import secateurs as sc  # noqa: E402
from secateurs.data import doc_paragraphs, text_batches  # noqa: E402
from secateurs.demo import load_minilm  # noqa: E402

warnings.filterwarnings("ignore")

CALIB, HELD_OUT, SEQ_LEN = 32, 64, 128
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _last_layers(model: Any, n: int) -> None:
    """Baseline: drop the last ``n`` encoder layers."""
    layers = model.encoder.layer
    keep = len(layers) - n
    layers._modules = {str(i): layers._modules[str(i)] for i in range(keep)}
    model.config.num_hidden_layers = keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dense, tokenizer = load_minilm()
    texts = doc_paragraphs(CALIB + HELD_OUT)
    calib = text_batches(tokenizer, texts[:CALIB], samples=CALIB, seq_len=SEQ_LEN, batch_size=8)
    example = {k: v[:2] for k, v in calib[0].items()}
    _, corpus, queries = retrieval_set(None)
    data = EvalSet(tokenize(tokenizer, texts[CALIB:]), tokenize(tokenizer, corpus), tokenize(tokenizer, queries))
    data.dense_held_out = embed(dense, data.held_out)
    base_cos, base_top1 = evaluate(dense, data)
    rows: list[dict[str, Any]] = [{"kind": "dense", "method": "-", "amount": 0, "cosine": base_cos,
                                   "top1": base_top1, "removed": ""}]
    print(f"all-MiniLM-L6-v2 dense: cosine 1.000, top-1 {base_top1:.3f}; torch {torch.__version__}, "
          f"{args.threads} threads, no recovery training\n")
    print(f"{'kind':<8} {'method':<10} {'amount':>7} {'cosine':>7} {'top-1':>6}  removed / note")
    for n in (1, 2, 3):
        for method in ("last", "bi", "angular", "greedy"):
            model = copy.deepcopy(dense)
            if method == "last":
                _last_layers(model, n)
                removed = ", ".join(f"layer.{i}" for i in range(6 - n, 6))
            else:
                report = sc.prune(model, example, layers=n, depth_criterion=method, calib=calib)
                removed = ", ".join(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
                                    for name, _ in report.depth[0].removed)
            cos, top1 = evaluate(model, data)
            rows.append({"kind": "layers", "method": method, "amount": n, "cosine": cos, "top1": top1,
                         "removed": removed})
            print(f"{'layers':<8} {method:<10} {n:>7} {cos:7.3f} {top1:6.3f}  {removed}")
    for method in ("uniform", "global", "lamp", "owl", "dp"):
        model = copy.deepcopy(dense)
        if method == "uniform":
            report = sc.prune(model, example, ratio=0.3, target="flops", importance="activation", calib=calib)
        else:
            report = sc.prune(model, example, ratio=0.3, allocate=method, budget_unit="flops",
                              importance="activation", calib=calib)
        cos, top1 = evaluate(model, data)
        sizes = "/".join(str(layer.intermediate.dense.out_features) for layer in model.encoder.layer)
        note = f"FLOPs -{100 * report.flop_ratio:.1f}%, FFN widths {sizes}"
        rows.append({"kind": "flops30", "method": method, "amount": 0.3, "cosine": cos, "top1": top1,
                     "removed": note})
        print(f"{'flops30':<8} {method:<10} {0.3:>7} {cos:7.3f} {top1:6.3f}  {note}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "depth.json"), "w") as f:
        json.dump(rows, f, indent=1)
    _plot(rows, os.path.join(RESULTS, "depth.png"))
    print(f"\nwrote {RESULTS}/depth.json and depth.png; total {time.perf_counter() - start:.0f}s")


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for method in ("last", "bi", "angular", "greedy"):
        pts = [(r["amount"], r["cosine"]) for r in rows if r["kind"] == "layers" and r["method"] == method]
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    a.set_xticks([1, 2, 3])
    a.set_xlabel("layers removed (of 6)")
    a.set_ylabel("embedding cosine to dense")
    a.legend(fontsize=8)
    alloc = [r for r in rows if r["kind"] == "flops30"]
    b.bar([r["method"] for r in alloc], [r["cosine"] for r in alloc], color="tab:blue")
    b.set_ylim(min(r["cosine"] for r in alloc) - 0.05, 1.0)
    b.set_title("30% FLOPs budget, activation scores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
