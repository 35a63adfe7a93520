"""Benchmark: prune a Llama checkpoint block by block from disk (streaming) against loading it whole.

The checkpoint has random weights in bf16 and real Llama shapes; it is generated on disk tensor by tensor (never
in memory at once) and cached under ``~/.cache/secateurs/out_of_core/<shape>``. Both runs prune with the same
options and write a checkpoint. ``--options width`` (default): FFN width 25% (l2 importance) + 2:4 magnitude
sparsity. ``--options full``: 1/8 of the blocks removed by block influence, 25% of the heads and 25% of the FFN
neurons by activation importance in one global ranking across blocks, then 2:4 by Wanda, calibrated on 8 random
token sequences of 128 (three walks over the weights when streaming: depth scores, width scores, pruning).

* ``streaming``: :func:`secateurs.stream.prune_checkpoint` (one block in memory at a time);
* ``in memory``: ``from_pretrained`` + :func:`secateurs.prune` + :func:`secateurs.save_pretrained`.

Each runs in its own process, which reports its peak RSS (``ru_maxrss``) and wall time; the two outputs are
checked to hold the same weights.

Usage::

    python benchmarks/bench_out_of_core.py [--shape 1b|7b|tiny] [--options width|full] [--skip-in-memory] [--keep]

``1b`` is Llama-3.2-1B's shape (2.5 GB), ``7b`` Llama-2-7B's (13.5 GB; the in-memory run then needs about
30 GB of RAM, so pass ``--skip-in-memory`` on smaller machines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 32000},
    # Llama-3.2-1B
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    # Llama-2-7B
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
OPTION_SETS = {
    "width": ({"ffn": 0.25, "nm": "2:4", "round_to": 8}, "FFN width -25% (l2) + 2:4 magnitude"),
    "full": ({"layers": 0.125, "heads": 0.25, "ffn": 0.25, "importance": "activation", "scope": "global", "nm": "2:4",
              "sparsity_criterion": "wanda", "round_to": 8},
             "1/8 of the blocks by block influence, heads -25% and FFN -25% by activation in one global ranking, "
             "2:4 by Wanda (8 x 128 random tokens)"),
}
CHUNK_ROWS = 4096


def generate(shape: str, folder: Path) -> bool:
    """A random bf16 Llama checkpoint of ``shape`` in ``folder``, written one row chunk at a time; False if cached."""
    import transformers as tf

    from secateurs.backends.sharded import ShardedWriter, shard_name

    if (folder / "config.json").is_file():
        return False
    cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        skeleton = tf.LlamaForCausalLM(cfg)
    tensors = [(n, tuple(t.shape)) for n, t in skeleton.state_dict().items()
               if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:  # shards of about 2 GB, like Hugging Face's
        nbytes = 2 * int(torch.tensor(dims).prod()) if dims else 2
        if groups[-1] and size + nbytes > 2 << 30:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    gen = torch.Generator().manual_seed(0)

    def chunks(name: str, dims: tuple[int, ...]):
        if name.endswith("norm.weight"):
            yield torch.ones(dims, dtype=torch.bfloat16)
            return
        for start in range(0, dims[0], CHUNK_ROWS):
            rows = min(CHUNK_ROWS, dims[0] - start)
            yield (torch.randn((rows, *dims[1:]), generator=gen) * 0.02).to(torch.bfloat16)

    with ShardedWriter(folder, overwrite=True) as writer:
        for i, group in enumerate(groups):
            writer.stream_shard(shard_name(i + 1, len(groups)), [
                (n, torch.bfloat16, d, lambda n=n, d=d: chunks(n, d)) for n, d in group])
        writer.commit(cfg.save_pretrained)
    return True


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _calib(options: dict, vocab: int) -> list | None:
    if not any(k in options for k in ("layers", "importance", "sparsity_criterion")):
        return None
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (1, 128), generator=g)} for _ in range(8)]


def run_streaming(src: Path, out: Path, options: dict) -> dict:
    from secateurs.stream import prune_checkpoint

    start = time.perf_counter()
    calib = _calib(options, json.loads((src / "config.json").read_text())["vocab_size"])
    report = prune_checkpoint(src, out, overwrite=True, calib=calib, **options)
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss(), "block_bytes": report.block_bytes,
            "peak_weight_bytes": report.peak_weight_bytes, "model_bytes": report.model_bytes,
            "passes": report.passes, "activation_bytes": report.peak_activation_bytes}


def run_in_memory(src: Path, out: Path, options: dict) -> dict:
    import transformers as tf

    import secateurs as sc
    from secateurs.passes import remove_masks

    start = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter() - start
    calib = _calib(options, model.config.vocab_size)
    sc.prune(model, calib[0] if calib else {"input_ids": torch.randint(0, 1000, (1, 8))}, calib=calib,
             sequential=calib is not None, check_outputs=False, **options)
    remove_masks(model)
    sc.save_pretrained(model, out, overwrite=True)
    return {"seconds": time.perf_counter() - start, "load_seconds": loaded, "peak_rss": _peak_rss()}


def _same_weights(a: Path, b: Path, names: list[str]) -> bool:
    from secateurs.backends.sharded import ShardedSource

    sa, sb = ShardedSource(a), ShardedSource(b)

    def get(source: ShardedSource, name: str) -> torch.Tensor:
        if name not in source and name == "model.embed_tokens.weight":
            name = "lm_head.weight"  # save_pretrained stores tied tensors once, under either name
        return source.load([name])[name]

    return all(torch.equal(get(sa, n), get(sb, n)) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "secateurs" / "out_of_core")
    parser.add_argument("--options", choices=sorted(OPTION_SETS), default="width", help="what to prune")
    parser.add_argument("--skip-in-memory", action="store_true", help="only the streaming run")
    parser.add_argument("--keep", action="store_true", help="keep the pruned outputs")
    parser.add_argument("--run", choices=["streaming", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    src = args.cache / args.shape
    if args.run:  # a child process: one run, its figures as JSON on the last line
        fn = run_streaming if args.run == "streaming" else run_in_memory
        print(json.dumps(fn(src, args.out, OPTION_SETS[args.options][0])))
        return
    start = time.perf_counter()
    generated = generate(args.shape, src)
    origin = f"generated in {time.perf_counter() - start:.0f} s" if generated else f"cached in {src}"
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    results = {}
    work = args.cache / f"{args.shape}-outputs"
    for mode in ["streaming"] + ([] if args.skip_in_memory else ["in-memory"]):
        proc = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--cache", str(args.cache),
                               "--options", args.options, "--run", mode, "--out", str(work / mode)],
                              capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    cfg = SHAPES[args.shape]
    lines = [f"Out-of-core pruning, Llama {args.shape} shape ({cfg['num_hidden_layers']} layers, hidden "
             f"{cfg['hidden_size']}, FFN {cfg['intermediate_size']}), random bf16 weights, {size / gib:.2f} GiB "
             f"on disk ({origin})",
             f"{OPTION_SETS[args.options][1]}; {os.cpu_count()} CPU cores, torch {torch.__version__}",
             "",
             f"{'run':<12} {'wall s':>8} {'peak RSS GiB':>13}",
             f"{'-' * 12} {'-' * 8} {'-' * 13}"]
    for mode, r in results.items():
        lines.append(f"{mode:<12} {r['seconds']:8.1f} {r['peak_rss'] / gib:13.2f}")
    s = results["streaming"]
    lines += ["", f"streaming: {s['passes']} walk(s) over the weights, largest block {s['block_bytes'] / gib:.3f} GiB, "
              f"most checkpoint bytes loaded at once {s['peak_weight_bytes'] / gib:.3f} GiB, calibration activations "
              f"{s['activation_bytes'] / gib:.3f} GiB, model {s['model_bytes'] / gib:.2f} GiB"]
    if "in-memory" in results:
        last = cfg["num_hidden_layers"] - 1 - (int(round(cfg["num_hidden_layers"] * 0.125)) if args.options == "full"
                                                else 0)
        names = ["model.layers.0.mlp.down_proj.weight", f"model.layers.{last}.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"]
        same = _same_weights(work / "streaming", work / "in-memory", names)
        lines.append(f"outputs hold the same weights ({', '.join(n.split('.', 1)[1] for n in names)}): {same}")
    print("\n".join(lines))
    suffix = "" if args.options == "width" else f"_{args.options}"
    out_txt = Path(__file__).parent / "results" / f"out_of_core_{args.shape}{suffix}.txt"
    out_txt.write_text("\n".join(lines) + f"\n\ncommand: python benchmarks/bench_out_of_core.py {' '.join(sys.argv[1:])}\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
