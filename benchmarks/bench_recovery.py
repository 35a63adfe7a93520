"""Benchmark: quality after pruning, after recovery by distillation, after recovery on the task loss alone.

Two models, CPU only, a few minutes:

- all-MiniLM-L6-v2 (the bundled sentence encoder), pruned like the demo: 25% of heads and 30% of FFN neurons
  by FLAP with bias compensation, then 2:4 by Wanda (masks kept through recovery). Metrics on 64 held-out
  documentation paragraphs: mean embedding cosine to the dense model, and recall@1 of a retrieval task (embed
  each paragraph's first and second half; a first half must find its own second half among the 64). Training
  data: first/second halves of 256 other paragraphs. Distillation: normalised MSE of the last hidden state plus
  0.5 x hidden-state matching (teacher = the dense model). Task loss: in-batch contrastive loss between the
  halves (no teacher).
- the tiny character LM of ``tools/train_tiny_lm.py`` (cached; trained first if missing), 40% of FFN neurons
  and 50% of query heads pruned. Metric: held-out perplexity (64 windows of the last 10% of the text).
  Distillation: KL of logits at T=2 (full fine-tuning, and LoRA rank 8); task loss: next-character
  cross-entropy. Training windows come from the training split, minus its last 2% (validation for the curves).

Usage::

    python benchmarks/bench_recovery.py [--lm-steps 60] [--minilm-steps 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from train_tiny_lm import SEQ, load_or_train, perplexity, splits  # noqa: E402

import secateurs as sc  # noqa: E402
from secateurs.data import doc_paragraphs, text_batches  # noqa: E402
from secateurs.demo import load_minilm  # noqa: E402
from secateurs.passes import Recover, RecoverOptions, check_nm  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = Path(ROOT) / "benchmarks" / "results"


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def _embed(model: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return _pool(out.last_hidden_state, enc["attention_mask"])


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])


def _pair_batches(tok, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    """Batches of ``2 * size`` rows: the first halves of ``size`` paragraphs, then their second halves."""
    out = []
    for i in range(0, len(texts) - size + 1, size):
        firsts, seconds = zip(*(_halves(t) for t in texts[i:i + size]), strict=True)
        enc = tok(list(firsts) + list(seconds), padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def contrastive(out, batch) -> torch.Tensor:
    """In-batch InfoNCE between first-half and second-half embeddings (temperature 0.05), both directions."""
    emb = _pool(out.last_hidden_state, batch["attention_mask"])
    a, b = emb.chunk(2)
    logits = a @ b.t() / 0.05
    target = torch.arange(len(a))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target))


def minilm_metrics(model, dense_emb, tok, test: list[str]) -> tuple[float, float]:
    cosine = float((dense_emb * _embed(model, tok, test)).sum(-1).mean())
    firsts, seconds = zip(*(_halves(t) for t in test), strict=True)
    sim = _embed(model, tok, list(firsts)) @ _embed(model, tok, list(seconds)).t()
    recall = float((sim.argmax(1) == torch.arange(len(test))).float().mean())
    return cosine, recall


def run_minilm(steps: int, rows: list, curves: dict) -> None:
    dense, tok = load_minilm()
    texts = doc_paragraphs(384)
    calib_texts, train, val, test = texts[:32], texts[32:288], texts[288:320], texts[320:384]
    dense_emb = _embed(dense, tok, test)
    calib = text_batches(tok, calib_texts, samples=32, seq_len=128, batch_size=8)
    calib = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in calib]
    example = {k: v[:2] for k, v in calib[0].items()}
    cpu = time.process_time()
    pruned = copy.deepcopy(dense)
    sc.prune(pruned, example, heads=0.25, ffn=0.3, importance="flap", bias_compensation=True, nm="2:4",
             sparsity_criterion="wanda", calib=calib)
    layers = [n for n, m in pruned.named_modules() if hasattr(m, "weight_mask")]  # residual writers stay dense
    rows.append(("MiniLM", "dense", *minilm_metrics(dense, dense_emb, tok, test), 0, 0.0))
    rows.append(("MiniLM", "pruned (25% heads, 30% FFN, 2:4)", *minilm_metrics(pruned, dense_emb, tok, test), 0,
                 (time.process_time() - cpu) / 60))
    data, held = _pair_batches(tok, train, 16), _pair_batches(tok, val, 16)
    variants = [
        ("recovered: distillation", dense, None, RecoverOptions(steps=steps, lr=1e-4, hidden_weight=0.5,
                                                                 eval_every=10, seed=0)),
        ("recovered: task loss only", None, contrastive, RecoverOptions(steps=steps, lr=1e-4, alpha=0.0,
                                                                         eval_every=10, seed=0)),
    ]
    for label, teacher, loss_fn, options in variants:
        model = copy.deepcopy(pruned)
        cpu = time.process_time()
        record = Recover(teacher, data, eval_data=held, options=options, loss_fn=loss_fn).run(
            sc.capture(model, example)).record
        minutes = (time.process_time() - cpu) / 60
        assert check_nm(model, 2, 4, layers) == [], "2:4 broken by recovery"
        rows.append(("MiniLM", label, *minilm_metrics(model, dense_emb, tok, test), record.steps, minutes))
        curves[f"MiniLM {label.split(': ')[1]}"] = [(p.step, p.eval_loss / record.curve[0].eval_loss)
                                                    for p in record.evaluations]


def run_lm(steps: int, rows: list, curves: dict) -> None:
    dense, vocab = load_or_train(600)
    train_ids, held = splits(vocab)
    cut = int(len(train_ids) * 0.98)
    train_part, val_part = train_ids[:cut], train_ids[cut:]
    gen = torch.Generator().manual_seed(1)

    def windows(src: torch.Tensor, count: int) -> torch.Tensor:
        idx = torch.randint(0, len(src) - SEQ - 1, (count,), generator=gen)
        return torch.stack([src[i:i + SEQ] for i in idx])

    calib = [{"input_ids": windows(train_part, 8)} for _ in range(4)]
    data = [{"input_ids": w, "labels": w} for w in (windows(train_part, 16) for _ in range(50))]
    val = [{"input_ids": w, "labels": w} for w in (windows(val_part, 16) for _ in range(2))]
    rows.append(("tiny LM", "dense", perplexity(dense, held), None, 0, 0.0))
    cpu = time.process_time()
    pruned = copy.deepcopy(dense)
    sc.prune(pruned, calib[0], ffn=0.4, heads=0.5, round_to=1, calib=calib)
    rows.append(("tiny LM", "pruned (40% FFN, 50% heads)", perplexity(pruned, held), None, 0,
                 (time.process_time() - cpu) / 60))
    variants = [
        ("recovered: distillation", dense, RecoverOptions(steps=steps, lr=1e-3, alpha=1.0, eval_every=10)),
        ("recovered: distillation, LoRA r8", dense, RecoverOptions(steps=steps, lr=3e-3, alpha=1.0, mode="lora",
                                                                    eval_every=10)),
        ("recovered: task loss only", None, RecoverOptions(steps=steps, lr=1e-3, alpha=0.0, eval_every=10)),
    ]
    for label, teacher, options in variants:
        model = copy.deepcopy(pruned)
        cpu = time.process_time()
        record = Recover(teacher, data, eval_data=val, options=options).run(sc.capture(model, calib[0])).record
        minutes = (time.process_time() - cpu) / 60
        rows.append(("tiny LM", label, perplexity(model, held), None, record.steps, minutes))
        curves[f"tiny LM {label.split(': ')[1]}"] = [(p.step, p.perplexity) for p in record.evaluations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-steps", type=int, default=60)
    parser.add_argument("--minilm-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start, cpu = time.perf_counter(), time.process_time()
    rows: list = []
    curves: dict = {}
    run_lm(args.lm_steps, rows, curves)
    run_minilm(args.minilm_steps, rows, curves)
    lines = [
        f"Recovery after pruning (torch {torch.__version__}, CPU, 2 threads); command: "
        f"python benchmarks/bench_recovery.py --lm-steps {args.lm_steps} --minilm-steps {args.minilm_steps}",
        "",
        f"{'model':<8} {'variant':<34} {'perplexity / cosine':>20} {'recall@1':>9} {'steps':>6} {'CPU min':>8}",
    ]
    for model, variant, metric, recall, steps, minutes in rows:
        rec = f"{recall:9.3f}" if recall is not None else f"{'-':>9}"
        lines.append(f"{model:<8} {variant:<34} {metric:20.4f} {rec} {steps:6d} {minutes:8.2f}")
    lines += ["", "tiny LM: held-out perplexity (lower is better); MiniLM: mean embedding cosine to the dense model "
              "and halves-retrieval recall@1 on 64 held-out paragraphs (higher is better).",
              f"total: {(time.perf_counter() - start) / 60:.1f} wall minutes, "
              f"{(time.process_time() - cpu) / 60:.1f} CPU minutes"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.txt").write_text(text + "\n")
    _plot(curves, RESULTS / "recovery.png")


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        axis = left if name.startswith("tiny LM") else right
        axis.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name.split(" ", 2)[-1]
                  if name.startswith("tiny LM") else name.removeprefix("MiniLM "))
    left.set(title="tiny LM: validation perplexity", xlabel="recovery step", ylabel="perplexity")
    right.set(title="MiniLM: validation loss / loss before recovery", xlabel="recovery step", ylabel="relative loss")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
