"""The ``secateurs`` command line's parser: its subcommands, flags and the validators of their values.

:mod:`secateurs.cli` runs the commands; ``tools/cli_reference.py`` generates ``docs/cli.md`` from this parser
(checked in CI, so the reference cannot drift).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__: list[str] = []


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def _amount(text: str) -> float:
    value = float(text)
    if value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) or a whole count, got {text}")
    return value


def _cosine(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:  # also refuses nan, which would switch the check off
        raise argparse.ArgumentTypeError(f"must be a cosine in [-1, 1], got {text}")
    return value


def _rel_error(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):  # also refuses nan, which would switch the check off
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _threads(text: str) -> int:
    import os

    value, cores = int(text), os.cpu_count() or 1
    if not 1 <= value <= cores:
        raise argparse.ArgumentTypeError(f"must be between 1 and this machine's {cores} cores, got {text}")
    return value


def _count(limit: int, low: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between {low} and {limit:,}, got {text}")
        return value
    return parse


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if sep and name else ()
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"must be NAME=D,D,... with positive sizes (e.g. pixel_values=1,3,224,224), "
                                         f"got {text!r}")
    return name, shape


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    common.add_argument("--quiet", action="store_true", help="print nothing on success (no progress bars)")
    common.add_argument("--json", action="store_true", help="print one JSON document on standard output")
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="secateurs", description="Prune neural networks.",
                                     epilog="exit codes: 0 ok, 2 bad input, 3 verification failed, 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="the main job on the bundled all-MiniLM-L6-v2")
    demo.add_argument("--out", default="secateurs-demo", help="output folder (default ./secateurs-demo)")
    demo.add_argument("--heads", type=_fraction, default=0.25, help="fraction of attention heads to remove")
    demo.add_argument("--ffn", type=_fraction, default=0.3, help="fraction of FFN neurons to remove")
    demo.add_argument("--nm", default="2:4", help="N:M weight sparsity after width pruning ('none' to skip)")
    from secateurs.passes.criteria import criteria_names

    demo.add_argument("--importance", default="flap", help=f"width importance: {', '.join(criteria_names())}")
    demo.add_argument("--no-bias-compensation", action="store_true", help="do not fold removed means into biases")
    demo.add_argument("--samples", type=_positive, default=32, help="calibration paragraphs")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and ONNX Runtime benchmark")

    pr = sub.add_parser("prune", parents=[common], help="prune a checkpoint folder (or an ONNX file) into a new one")
    pr.add_argument("src", help="Hugging Face checkpoint folder (config.json + safetensors) or model.onnx")
    pr.add_argument("--out", help="output folder / .onnx file (written atomically; refused if it exists)")
    pr.add_argument("--recipe", help="YAML recipe of passes (instead of the pruning flags)")
    g = pr.add_argument_group("pruning flags (a one-step recipe)")
    g.add_argument("--channels", type=_fraction, help="fraction of conv channels to remove")
    g.add_argument("--heads", type=_fraction, help="fraction of attention heads to remove")
    g.add_argument("--kv-groups", type=_fraction, help="fraction of GQA KV groups to remove")
    g.add_argument("--ffn", type=_fraction, help="fraction of MLP / GLU neurons to remove")
    g.add_argument("--hidden", type=_fraction, help="fraction of the hidden size to remove")
    g.add_argument("--experts", type=_fraction, help="fraction of MoE experts to remove")
    g.add_argument("--layers", type=_amount, help="blocks to remove: a count >= 1 or a fraction")
    g.add_argument("--sublayers", type=_amount, help="attention / MLP sublayers to remove: a count or a fraction")
    from secateurs.passes.allocate import ALLOCATORS
    from secateurs.passes.criteria import step_criteria

    g.add_argument("--depth-criterion", help=", ".join(step_criteria("depth")) + " (default bi)")
    g.add_argument("--sparsity", type=_fraction, help="unstructured weight sparsity")
    g.add_argument("--nm", help="N:M weight sparsity, e.g. 2:4")
    g.add_argument("--low-rank", type=_fraction, help="factorize linear layers keeping this fraction of energy")
    g.add_argument("--criterion", help=f"width importance: {', '.join(criteria_names())} (default: flap with "
                   "calibration text, l2 with --calib none or without a tokenizer)")
    g.add_argument("--sparsity-criterion", help=", ".join(step_criteria("sparsity")) + " (default magnitude; wanda with "
                   "--allocate unipruning)")
    g.add_argument("--bias-compensation", action=argparse.BooleanOptionalAction, default=None,
                   help="fold the removed channels' calibration means into the next layers' biases (FLAP; default "
                   "on with --criterion flap, which is the default when there is calibration text)")
    g.add_argument("--allocate", help=f"width budget allocator: {', '.join(ALLOCATORS)}; weight sparsity "
                   "(--sparsity / --nm): unipruning")
    g.add_argument("--scope", choices=("local", "global"), help="width ranking per layer (local, default) or one "
                   "ranking across layers (global)")
    g.add_argument("--round-to", type=_positive, help="keep sizes multiples of this (default 8)")
    g.add_argument("--uniform", action="store_true", default=None, help="keep every layer's sizes alike (an "
                   "allocator's per-layer ratios equalised per structure), so plain from_pretrained and every "
                   "engine load the result")
    g.add_argument("--tp", type=_positive, metavar="N", help="keep every pruned layer shardable over N "
                   "tensor-parallel ranks: query heads and FFN width multiples of N, KV groups a multiple or a "
                   "divisor of N")
    g.add_argument("--recover", type=_positive, metavar="STEPS",
                   help="then train the pruned model against the dense one on the calibration text for STEPS steps")
    g.add_argument("--recover-mode", choices=("full", "lora"), help="recovery training of all weights or LoRA "
                   "adapters merged at the end (default full)")
    pr.add_argument("--calib", help="calibration text: pydoc (default), a .txt / .jsonl file, or none")
    pr.add_argument("--calib-samples", type=_positive, help="calibration texts (default 16)")
    pr.add_argument("--seq-len", type=_positive, help="tokens per calibration text (default 64)")
    pr.add_argument("--seed", type=int, help="random seed (default 0)")
    pr.add_argument("--device", default="cpu", help="cpu or cuda")
    from secateurs.spec import OPTIONS, path_options

    pr.add_argument("--stream", action="store_true", help="out-of-core: load, prune and write one decoder block at a "
                    f"time ({' '.join(f for o in path_options('stream') if (f := OPTIONS[o].flag))} --calib)")
    pr.add_argument("--dry-run", action="store_true", help="plan and report, write nothing (block by block, as --stream does, when the "
                    "checkpoint does not fit in memory)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pr.add_argument("--format", choices=("hf", "decilm"), help="checkpoint format: hf (default; per-layer sizes "
                    "in secateurs.json) or decilm (Nemotron-NAS block_configs: per-layer KV groups, FFN widths and "
                    "removed sublayers, which vLLM, SGLang and TensorRT-LLM load; Llama-family decoders)")
    pr.add_argument("--expert-layout", choices=("source", "fused", "per-expert"),
                    help="how MoE experts are written: as the source stores them (default; per-expert needs a "
                    "pruning plain from_pretrained can load), fused (one tensor per layer), or per-expert "
                    "(experts.N.w1.weight)")
    pr.add_argument("--no-verify", action="store_true", help="skip the final output check (shapes and drift)")
    pr.add_argument("--verify-rewrite", choices=("fast", "full", "off"),
                    help="how each width rewrite is checked against the plan: fast (default: one forward of the "
                    "pruned model replayed against the dense recording, every traced shape and the outputs against the "
                    "masked dense model, node by node on any doubt), full (a torch.export capture, every shape and "
                    "value node by node: slower, proves the result still exports), off")
    pr.add_argument("--min-cosine", type=_cosine, help="fail (exit 3) if the outputs' cosine to the dense model is "
                    "lower (in [-1, 1])")
    pr.add_argument("--max-rel-error", type=_rel_error, help="fail (exit 3) if the outputs' relative error is higher")
    pr.add_argument("--input-shape", type=_input_shape, action="append", metavar="NAME=D,D,...",
                    help="ONNX sources: static shape of an input with symbolic dims (repeat per input)")

    ex = sub.add_parser("export", parents=[common], help="export a (pruned) checkpoint folder to ONNX")
    ex.add_argument("src", help="checkpoint folder")
    ex.add_argument("--onnx", required=True, help="output .onnx file")
    ex.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="compare ONNX Runtime with PyTorch (default on)")
    ex.add_argument("--exporter", default="dynamo", help="dynamo (default) or legacy")
    ex.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="weights / activations")
    ex.add_argument("--atol", type=_tolerance, help="absolute tolerance of the verification (1e-4; 2e-2 for fp16)")
    ex.add_argument("--rtol", type=_tolerance, help="relative tolerance of the verification (1e-3; 2e-2 for fp16)")
    ex.add_argument("--seq-len", type=_positive, default=16, help="tokens of the example input")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing file")

    en = sub.add_parser("engine", parents=[common], help="build a TensorRT engine from an ONNX file")
    en.add_argument("onnx", help="input .onnx file")
    en.add_argument("--out", help="engine file (default: the ONNX name with .engine)")
    en.add_argument("--fp16", action="store_true", help="FP16 kernels (TensorRT 10; TensorRT 11 reads the file)")
    en.add_argument("--sparse", action="store_true", help="enable 2:4 sparse kernels (SPARSE_WEIGHTS)")
    en.add_argument("--timing-cache", help="timing cache file, read and updated")
    en.add_argument("--max-batch", type=_positive, default=8, help="largest batch of the optimisation profile")
    en.add_argument("--overwrite", action="store_true", help="replace an existing engine file")

    ins = sub.add_parser("inspect", parents=[common], help="dependency groups, frozen parts and costs of a model")
    ins.add_argument("src", help="checkpoint folder or .onnx file")
    ins.add_argument("--input-shape", type=_input_shape, action="append", metavar="NAME=D,D,...",
                     help="ONNX sources: static shape of an input with symbolic dims (repeat per input)")

    be = sub.add_parser("bench", parents=[common], help="latency of a dense and a pruned model, as a ratio (a "
                        "pruned folder's report records it)")
    be.add_argument("src", help="dense checkpoint folder or .onnx file")
    be.add_argument("dst", help="pruned checkpoint folder or .onnx file")
    be.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"))
    be.add_argument("--batch", type=_count(4096), default=1)
    be.add_argument("--seq-len", type=_count(1 << 20), default=128)
    be.add_argument("--runs", type=_count(100_000), default=20)
    be.add_argument("--warmup", type=_count(100_000, 0), default=3)
    be.add_argument("--threads", type=_threads, help="ONNX Runtime / torch threads, at most the machine's cores "
                    "(default: all)")
    return parser
