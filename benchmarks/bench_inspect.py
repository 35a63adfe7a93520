"""Benchmark: ``secateurs inspect`` of 7B- and 70B-shape Llama checkpoints, time and peak memory.

    python benchmarks/bench_inspect.py            # 7b and 70b
    python benchmarks/bench_inspect.py --shape 7b
    python benchmarks/bench_inspect.py --shape 7b --dry-run   # also `secateurs prune DIR --ffn 0.3 --dry-run`

Each checkpoint is a folder with Llama-2's config and sharded bf16 safetensors (``model.safetensors.index.json``
plus 5 GB shards), written as sparse files: the headers are real and the tensor data are holes, so a 140 GB
checkpoint takes no disk space. That is enough for inspect, which reads no weight: it builds the model on the
meta device, checks every stored shape against it (the headers), records one forward on meta inputs and
analyses it. ``secateurs inspect DIR --json`` runs in a child process; its wall time and peak RSS
(``ru_maxrss`` of the child) are printed with the number of groups it found. Targets (issue 19): 7B under 15 s
and 2 GiB, 70B under 60 s. With ``--dry-run``, ``secateurs prune DIR --ffn 0.3 --calib none --dry-run --json``
is timed the same way: the checkpoint does not fit in memory, so it is planned block by block (every weight is
read once; the holes read as zeros).
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000},
}
SHARD_BYTES = 5 << 30


def _tensors(cfg: dict[str, int]) -> list[tuple[str, list[int]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", [v, h])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, h]),
                (p + "mlp.gate_proj.weight", [f, h]), (p + "mlp.up_proj.weight", [f, h]),
                (p + "mlp.down_proj.weight", [h, f]), (p + "input_layernorm.weight", [h]),
                (p + "post_attention_layernorm.weight", [h])]
    return out + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def _write_sparse_shard(path: Path, tensors: list[tuple[str, list[int]]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors:
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # the data: a hole


def make_checkpoint(folder: Path, shape: str) -> int:
    """Write the sparse checkpoint; returns its parameter count."""
    cfg = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    total = 0
    for name, dims in _tensors(cfg):
        n = 1
        for d in dims:
            n *= d
        total += n
        if size + 2 * n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += 2 * n
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_sparse_shard(folder / fname, tensors)
        weight_map.update({name: fname for name, _ in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * total},
                                                                     "weight_map": weight_map}))
    return total


def _child(shape: str, what: str, argv: list[str]) -> tuple[dict[str, Any], float, float] | None:
    """Run ``secateurs ARGV`` in a child process: its JSON, wall seconds and the children's peak RSS in GiB."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "secateurs", *argv], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)  # KiB -> GiB
    if done.returncode != 0:
        print(f"{shape}: {what} failed ({done.returncode}): {done.stdout[-400:]}{done.stderr[-400:]}")
        return None
    return json.loads(done.stdout), wall, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: all")
    parser.add_argument("--dry-run", action="store_true", help="also time an in-memory `prune --dry-run`")
    args = parser.parse_args()
    for shape in args.shape or ["7b", "70b"]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / shape
            params = make_checkpoint(folder, shape)
            found = _child(shape, "inspect", ["inspect", str(folder), "--json"])
            if found is None:
                return 1
            data, wall, rss = found
            print(f"{shape}: {params / 1e9:.1f}B parameters (bf16, {2 * params / 2**30:.0f} GiB sparse shards): "
                  f"inspect {wall:.1f} s, peak RSS {rss:.2f} GiB (largest child so far), {len(data['groups'])} "
                  f"groups, {len(data['frozen'])} frozen, params {data['params']:,}", flush=True)
            if args.dry_run:
                found = _child(shape, "dry run", ["prune", str(folder), "--ffn", "0.3", "--calib", "none",
                                                  "--dry-run", "--json"])
                if found is None:
                    return 1
                data, wall, rss = found
                print(f"{shape}: prune --ffn 0.3 --dry-run {wall:.1f} s, peak RSS {rss:.2f} GiB (largest child so "
                      f"far), {len(data['widths'])} groups planned, peak weights in memory "
                      f"{data['peak_weight_bytes'] / 2**30:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
