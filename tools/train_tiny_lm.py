"""Train a tiny Llama-style character language model on Python's bundled documentation (CPU, minutes).

Deterministic (fixed seeds, one data order). The checkpoint goes to a cache folder outside the repository
(``$SECATEURS_CACHE/tiny_lm`` or ``~/.cache/secateurs/tiny_lm``) and is reused when it exists; it is never
committed. The held-out split is the last 10% of the text.

Usage::

    python tools/train_tiny_lm.py [--steps 600] [--force]

Other scripts import :func:`load_or_train`, :func:`corpus` and :func:`encode`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEQ = 128


def cache_dir() -> Path:
    root = os.environ.get("SECATEURS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "secateurs")
    return Path(root) / "tiny_lm"


def corpus() -> str:
    """All pydoc topics, sorted by name, whitespace-normalised per paragraph."""
    from pydoc_data.topics import topics

    return "\n".join(" ".join(topics[k].split()) for k in sorted(topics))


def vocabulary(text: str) -> list[str]:
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def splits(vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    data = encode(corpus(), vocab)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def build(vocab_size: int):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg)


def train(steps: int) -> tuple[torch.nn.Module, list[str]]:
    torch.manual_seed(0)
    text = corpus()
    vocab = vocabulary(text)
    train_ids, _ = splits(vocab)
    model = build(len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(train_ids) - SEQ - 1, (16,), generator=gen)
        batch = torch.stack([train_ids[i:i + SEQ] for i in idx])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return model.eval(), vocab


def load_or_train(steps: int = 600, force: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """The cached tiny LM (trained first if missing) and its character vocabulary."""
    import secateurs as sc

    folder = cache_dir() / f"steps{steps}"
    if folder.is_dir() and not force:
        vocab = json.loads((folder / "vocab.json").read_text())
        return sc.load_pretrained(folder), vocab
    model, vocab = train(steps)
    sc.save_pretrained(model, folder, overwrite=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return model, vocab


def perplexity(model: torch.nn.Module, ids: torch.Tensor, windows: int = 64) -> float:
    """exp(mean next-character loss) over ``windows`` evenly spaced held-out windows of ``SEQ`` characters."""
    starts = torch.linspace(0, len(ids) - SEQ - 1, windows).long()
    batch = torch.stack([ids[s:s + SEQ] for s in starts])
    with torch.no_grad():
        return float(torch.exp(model(input_ids=batch, labels=batch).loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--force", action="store_true", help="train again even if a checkpoint is cached")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, vocab = load_or_train(args.steps, args.force)
    _, held = splits(vocab)
    print(f"held-out perplexity: {perplexity(model, held):.3f} ({len(vocab)} characters, cache {cache_dir()})")


if __name__ == "__main__":
    main()
