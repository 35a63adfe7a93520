"""Time the reload check of a streamed output against the whole streamed run (docs/checkpoints.md, streamed outputs).

    python benchmarks/bench_stream_reload.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import secateurs.stream as stream
import secateurs.streaming.writer as writer  # the last walk runs the reload check


def run(vocab: int, **options: float) -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model.save_pretrained(src, max_shard_size="4MB")
        real = writer.check_streamed_reload
        spent: list[float] = []

        def timed(*args: object, **kwargs: object) -> None:
            start = time.perf_counter()
            real(*args, **kwargs)  # type: ignore[arg-type]
            spent.append(time.perf_counter() - start)

        writer.check_streamed_reload = timed  # type: ignore[assignment]
        for i in range(3):
            start = time.perf_counter()
            stream.prune_checkpoint(src, Path(tmp) / f"out{i}", **options)
            total = time.perf_counter() - start
            print(f"vocab {vocab}, {options}, run {i}: streamed run {total:.2f} s, reload check {spent[-1]:.3f} s ({100 * spent[-1] / total:.1f}%)")


def main() -> None:
    run(2000, heads=0.25, ffn=0.25)
    # Embeddings and LM head as large as the 8 blocks together (a 32k vocabulary at width 512): the worst case for
    # the bit-for-bit read-back of the tensors outside the blocks; the hidden size is pruned, so they are sliced.
    run(32000, heads=0.25, ffn=0.25, hidden=0.25)


if __name__ == "__main__":
    main()
