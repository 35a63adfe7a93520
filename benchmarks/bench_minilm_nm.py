"""Benchmark: 2:4 sparsity of every encoder Linear of the real all-MiniLM-L6-v2, criterion by criterion.

All 36 encoder Linear layers (q / k / v, attention output, FFN up and down projections of the 6 layers) are made
2:4 sparse; only the pooler (an output head, unused by mean pooling) stays dense. No recovery training.
Calibration: the first 32 of Python's documentation paragraphs (``secateurs.data.doc_paragraphs(96)[:32]``,
128 tokens, batches of 8), as in ``bench_minilm.py``; quality: the mean cosine between the pruned and the dense
model's mean-pooled sentence embeddings on the 64 paragraphs after them.

Methods: ``magnitude``, ``wanda``, ``sparsegpt`` (all layers calibrated on the dense inputs), ``sparsegpt``
with ``sequential=True`` (each layer calibrated on the already pruned layers' outputs) and ARMOR (a 2:4 core
between 4x4 block-diagonal factors, ``FactorizeARMOR``, 100 steps per layer).

Usage::

    python benchmarks/bench_minilm_nm.py [--threads 2]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import secateurs as sc  # noqa: E402
from secateurs.data import doc_paragraphs, text_batches  # noqa: E402
from secateurs.demo import load_minilm, mean_pool  # noqa: E402
from secateurs.passes import AnalyzeDependencies, FactorizeARMOR, check_nm  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("secateurs").setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tokenizer = load_minilm()
    texts = doc_paragraphs(96)
    calib = text_batches(tokenizer, texts[:32], samples=32, seq_len=128, batch_size=8)
    held = dict(tokenizer(texts[32:], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    held.pop("token_type_ids", None)
    reference = mean_pool(dense, held)
    example = {k: v[:2] for k, v in calib[0].items()}
    encoder = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    print(f"all-MiniLM-L6-v2, 2:4 on {len(encoder)} encoder Linear layers; cosine to dense on {len(texts) - 32} "
          f"held-out paragraphs; torch {torch.__version__}, {args.threads} threads\n")
    print(f"{'method':<24} {'cosine':>8} {'seconds':>8}")
    rows = [("magnitude", {"sparsity_criterion": "magnitude"}), ("wanda", {"sparsity_criterion": "wanda"}),
            ("sparsegpt", {"sparsity_criterion": "sparsegpt"}),
            ("sparsegpt (sequential)", {"sparsity_criterion": "sparsegpt", "sequential": True})]
    for label, options in rows:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = sc.prune(model, example, nm="2:4", calib=calib, **options)
        seconds = time.perf_counter() - start
        sc.passes.remove_masks(model)
        assert check_nm(model, 2, 4, encoder) == [] and len(report.sparsity.layers) == len(encoder)
        cosine = float((reference * mean_pool(model, held)).sum(-1).mean())
        print(f"{label:<24} {cosine:8.3f} {seconds:8.1f}")
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    graph = sc.capture(model, example)
    AnalyzeDependencies()(graph)
    record = FactorizeARMOR(calib=calib, steps=100)(graph).record
    seconds = time.perf_counter() - start
    cosine = float((reference * mean_pool(model, held)).sum(-1).mean())
    layers = len(record.layers) if hasattr(record, "layers") else "?"
    print(f"{'armor (4x4 blocks)':<24} {cosine:8.3f} {seconds:8.1f}   ({layers} layers factorised)")


if __name__ == "__main__":
    main()
