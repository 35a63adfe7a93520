"""Benchmark: held-out perplexity of a tiny character LM, dense vs 50% unstructured and 2:4 sparsity.

The model comes from ``tools/train_tiny_lm.py`` (trained for about 80 s on Python's documentation and cached
outside the repository). Calibration: 32 windows of 128 characters from the training split; evaluation: 64
windows of the held-out split. Criteria: magnitude (also with the least-squares refit), Wanda and SparseGPT
(both calibrated all at once and block by block), global magnitude for the unstructured budget, and ARMOR
(2:4 core between 4x4 block-diagonal factors) for 2:4. No recovery training. The papers report
SparseGPT <= Wanda << magnitude at 2:4; this prints what happens here.

Usage::

    python benchmarks/bench_sparsity.py [--steps 600]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from train_tiny_lm import SEQ, load_or_train, perplexity, splits  # noqa: E402

import secateurs as sc  # noqa: E402
from secateurs.passes import AnalyzeDependencies, FactorizeARMOR, check_nm  # noqa: E402

warnings.filterwarnings("ignore")

METHODS = [
    ("magnitude", "magnitude", False),
    ("magnitude + least squares", "magnitude+ls", False),
    ("global_magnitude", "global_magnitude", False),
    ("wanda", "wanda", False),
    ("wanda (sequential)", "wanda", True),
    ("sparsegpt", "sparsegpt", False),
    ("sparsegpt (sequential)", "sparsegpt", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of the cached tiny LM")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    dense, vocab = load_or_train(args.steps)
    train_ids, held = splits(vocab)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(train_ids) - SEQ - 1, (32,), generator=gen)
    windows = torch.stack([train_ids[i:i + SEQ] for i in idx])
    calib = [{"input_ids": windows[i:i + 8]} for i in range(0, 32, 8)]
    example = calib[0]
    print(f"tiny Llama LM ({sum(p.numel() for p in dense.parameters()):,} parameters, {len(vocab)} characters), "
          f"held-out perplexity over 64 windows of {SEQ}; torch {torch.__version__}, 2 threads\n")
    print(f"{'method':<28} {'50% unstructured':>17} {'2:4':>9}")
    print(f"{'dense':<28} {perplexity(dense, held):17.3f} {perplexity(dense, held):9.3f}")
    for label, criterion, sequential in METHODS:
        cells = []
        for pattern in ("unstructured", "2:4"):
            if criterion == "global_magnitude" and pattern == "2:4":
                cells.append("-")
                continue
            model = copy.deepcopy(dense)
            kw = {"nm": "2:4"} if pattern == "2:4" else {"sparsity": 0.5}
            refit = criterion.endswith("+ls")
            sc.prune(model, example, sparsity_criterion=criterion.removesuffix("+ls"), calib=calib,
                     sequential=sequential, reconstruct=refit, **kw)
            if pattern == "2:4":
                names = [n for n, _ in model.named_modules() if n.endswith("proj")]
                assert check_nm(model, 2, 4, names) == [], "2:4 pattern broken"
            cells.append(f"{perplexity(model, held):.3f}")
        print(f"{label:<28} {cells[0]:>17} {cells[1]:>9}")
    model = copy.deepcopy(dense)
    graph = sc.capture(model, example)
    AnalyzeDependencies()(graph)
    record = FactorizeARMOR(calib=calib, steps=100)(graph).record
    gain = sum(f / s for _, s, f in record.layers if s > 0) / max(len(record.layers), 1)
    print(f"{'armor (2:4 core, 4x4 blocks)':<28} {'-':>17} {perplexity(model, held):9.3f}"
          f"   (proxy loss x{gain:.2f} of SparseGPT's on average)")
    print(f"\ntotal {time.perf_counter() - start:.0f}s (the LM head and embeddings stay dense)")


if __name__ == "__main__":
    main()
