"""Benchmark: ONNX Runtime latency of dense vs pruned real-size models (CPU, 2 threads).

ResNet-50 (channels pruned at 30% and 50%) and BERT-base (heads and FFN neurons at 30% and 50%), both from
default Hugging Face configs with random weights, are pruned with secateurs, exported with ``export_onnx``
(verified against PyTorch) and timed in ONNX Runtime on the same inputs; the table prints the measured speed-up
beside the FLOP reduction (the ideal speed-up). Random weights do not change latency.

Usage::

    python benchmarks/bench_onnx.py [--runs 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import secateurs as sc  # noqa: E402
from secateurs.backends.onnx import export_onnx, ort_latency  # noqa: E402

warnings.filterwarnings("ignore")


def _models() -> list[tuple[str, torch.nn.Module, object, list[dict[str, float]]]]:
    import transformers as tf

    torch.manual_seed(0)
    resnet = tf.ResNetForImageClassification(tf.ResNetConfig()).eval()
    bert = tf.BertForSequenceClassification(tf.BertConfig()).eval()
    ids = torch.randint(0, 30000, (1, 128))
    return [
        ("ResNet-50, 1x3x224x224", resnet, (torch.randn(1, 3, 224, 224),),
         [{"ratio": 0.3}, {"ratio": 0.5}]),
        ("BERT-base, 1x128 tokens", bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
         [{"heads": 0.3, "ffn": 0.3}, {"heads": 0.5, "ffn": 0.5}]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"ONNX Runtime CPU, 2 threads, median of {args.runs} runs; torch {torch.__version__}\n")
    print(f"{'model':<26} {'pruning':<22} {'FLOPs':>8} {'ideal':>6} {'dense ms':>9} {'pruned ms':>10} {'speed-up':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, inputs, settings in _models():
            dense_path = export_onnx(model, inputs, os.path.join(tmp, "dense.onnx"), atol=1e-3, rtol=1e-2).path
            dense_ms = 1e3 * ort_latency(dense_path, model, inputs, runs=args.runs, threads=2)
            for kw in settings:
                pruned = copy.deepcopy(model)
                report = sc.prune(pruned, inputs, **kw)
                path = export_onnx(pruned, inputs, os.path.join(tmp, "pruned.onnx"), atol=1e-3, rtol=1e-2).path
                ms = 1e3 * ort_latency(path, pruned, inputs, runs=args.runs, threads=2)
                ideal = report.flops_before / report.flops_after
                desc = ", ".join(f"{k} {v:.0%}" for k, v in kw.items())
                print(f"{label:<26} {desc:<22} {-100 * report.flop_ratio:7.1f}% {ideal:5.2f}x {dense_ms:9.2f} "
                      f"{ms:10.2f} {dense_ms / ms:8.2f}x")


if __name__ == "__main__":
    main()
