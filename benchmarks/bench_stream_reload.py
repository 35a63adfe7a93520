"""Time the reload check of a streamed output against the whole streamed run (README, "Reload before rename").

    python benchmarks/bench_stream_reload.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import secateurs.stream as stream


def main() -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=2000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model.save_pretrained(src, max_shard_size="4MB")
        real = stream.check_streamed_reload
        spent: list[float] = []

        def timed(*args: object, **kwargs: object) -> None:
            start = time.perf_counter()
            real(*args, **kwargs)  # type: ignore[arg-type]
            spent.append(time.perf_counter() - start)

        stream.check_streamed_reload = timed  # type: ignore[assignment]
        for i in range(3):
            start = time.perf_counter()
            stream.prune_checkpoint(src, Path(tmp) / f"out{i}", heads=0.25, ffn=0.25)
            total = time.perf_counter() - start
            print(f"run {i}: streamed run {total:.2f} s, reload check {spent[-1]:.3f} s ({100 * spent[-1] / total:.1f}%)")


if __name__ == "__main__":
    main()
