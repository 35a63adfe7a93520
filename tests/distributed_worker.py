"""Calibration scenarios run single-process by tests/test_distributed.py and under torchrun by this script.

``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT`` prunes every scenario on every rank
and writes each rank's pruned weights to ``OUT/<scenario>.rank<r>.safetensors``; then it prunes a sharded
checkpoint block by block (:func:`stream`) into ``OUT/stream``, written by rank 0; rank 0 also writes
``OUT/meta.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

SCENARIOS = {
    "wanda_2_4": {"nm": "2:4", "sparsity_criterion": "wanda"},
    "sparsegpt_2_4_sequential": {"nm": "2:4", "sparsity_criterion": "sparsegpt", "sequential": True},
    "activation_ffn_sparsegpt": {"ffn": 0.25, "importance": "activation", "round_to": 8, "sparsity": 0.5,
                                 "sparsity_criterion": "sparsegpt"},
    "taylor_ffn": {"ffn": 0.25, "importance": "taylor", "round_to": 8},
    "moe_experts_by_frequency": {"experts": 0.5, "expert_importance": "frequency"},
    "depth_block_influence": {"layers": 1},
    "cfsp_allocated_ffn": {"ffn": 0.25, "allocate": "cfsp", "round_to": 8},
}


def build_moe(batches: int = 5):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = tf.MixtralForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 120, (2, 8 + 2 * i))} for i in range(batches)]
    return model, calib


def build(layers: int = 2, batches: int = 5):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    # an odd number of batches of different lengths: the ranks get unequal shares
    calib = [{"input_ids": torch.randint(0, 120, (2, 8 + 2 * i))} for i in range(batches)]
    return model, calib


def run(name: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune a fresh model by scenario ``name``; its weights (masks made permanent) and its depth scores."""
    import secateurs as sc
    from secateurs.passes import remove_masks

    options = SCENARIOS[name]
    model, calib = build_moe() if "experts" in options else build(4 if "layers" in options or "allocate" in options
                                                                 else 2)
    report = sc.prune(model, calib[0], calib=calib, check_outputs=False, **options)
    remove_masks(model)
    scores = {n: v for d in report.depth for n, v in d.scores}
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, scores


STREAM_OPTIONS = {"layers": 1, "heads": 0.5, "ffn": 0.25, "importance": "activation", "nm": "2:4",
                  "sparsity_criterion": "wanda"}
STREAM_LAYERS = 4


def stream(src: Path, dst: Path, batches: int = 5) -> Any:
    """Streaming prune of ``src`` (a sharded checkpoint of :func:`build`'s 4-layer model) with calibration."""
    from secateurs.stream import prune_checkpoint

    _, calib = build(STREAM_LAYERS)
    return prune_checkpoint(src, dst, calib=calib[:batches], **STREAM_OPTIONS)


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from secateurs import distributed

    assert distributed.init("gloo"), "start me with torchrun"
    out.mkdir(parents=True, exist_ok=True)
    for name in SCENARIOS:
        state, scores = run(name)
        state.pop("lm_head.weight", None)  # tied to the embeddings
        save_file(state, str(out / f"{name}.rank{distributed.rank()}.safetensors"))
        (out / f"{name}.rank{distributed.rank()}.json").write_text(json.dumps(scores))
    if distributed.is_writer():
        from test_stream import save_sharded

        save_sharded(build(STREAM_LAYERS)[0], out / "src")
    distributed.barrier()
    report = stream(out / "src", out / "stream")
    try:  # one batch for two processes: refused on every rank, before anything is written
        stream(out / "src", out / "one-batch", batches=1)
        refused = ""
    except Exception as exc:  # noqa: BLE001 - the message is the result
        refused = f"{type(exc).__name__}: {exc}"
    (out / f"stream.rank{distributed.rank()}.json").write_text(json.dumps(
        {"calibration_batches": report.calibration_batches, "refused": refused}))
    if distributed.is_writer():
        (out / "meta.json").write_text(json.dumps({"world_size": distributed.world_size(),
                                                   "scenarios": list(SCENARIOS)}))
    distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
