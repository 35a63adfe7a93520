"""Benchmark: realized vs ideal speed-up of pruned ResNet-50 and BERT-base (ONNX Runtime; TensorRT on a GPU).

ResNet-50 (``ResNetModel`` with the default, resnet-50 config) and BERT-base (``BertModel``, default config),
random weights (they do not change latency), are pruned with secateurs: 30% and 50% of channels (ResNet) or of
heads and FFN neurons (BERT), and 2 blocks removed (2 of ResNet's 16 bottleneck blocks, 2 of BERT's 12 layers).
Each is exported with ``export_onnx`` (verified against PyTorch) and timed at batch 1 and 8. The table puts the
realized speed-up next to the ideal one (the FLOP ratio) and their quotient; the goal is realized >= 0.9 x ideal.

Backends: ONNX Runtime on the CPU (2 threads), and with ``--providers`` its CUDA / TensorRT execution providers
where installed. With ``--gpu`` (or whenever TensorRT and a CUDA GPU are present) also PyTorch CUDA (FP16) and
TensorRT FP16 engines: dense vs 2:4 sparse (``SPARSE_WEIGHTS``; the layers TensorRT ran sparse are listed) vs
pruned. ``--gpu`` skips the CPU rows.

Usage::

    python benchmarks/bench_speedup.py [--runs 10] [--batches 1,8] [--providers cpu,cuda,trt] [--out FILE]
    python benchmarks/bench_speedup.py --gpu [--variants dense,2:4,50%]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import secateurs as sc  # noqa: E402
from secateurs.backends.onnx import export_onnx  # noqa: E402
from secateurs.passes import AnalyzeDependencies, SparsifyWeights  # noqa: E402
from secateurs.passes.sparsity import SparsityRecord, remove_masks  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "speedup.txt")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
GOAL = 0.9


@dataclass
class Spec:
    label: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[int], Any]
    settings: list[tuple[str, dict[str, Any]]]
    trt_shapes: Callable[[int], dict[str, tuple[int, ...]]]


def _specs() -> list[Spec]:
    import transformers as tf

    def resnet() -> torch.nn.Module:
        torch.manual_seed(0)
        return tf.ResNetModel(tf.ResNetConfig()).eval()

    def bert() -> torch.nn.Module:
        torch.manual_seed(0)
        return tf.BertModel(tf.BertConfig()).eval()

    def pixels(b: int) -> Any:
        return (torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b)),)

    def tokens(b: int) -> Any:
        ids = torch.randint(0, 30000, (b, 128), generator=torch.Generator().manual_seed(b))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return [
        Spec("ResNet-50, 224x224", resnet, pixels,
             [("channels 30%", {"ratio": 0.3}), ("channels 50%", {"ratio": 0.5}), ("2 of 16 blocks", {"layers": 2})],
             lambda b: {"pixel_values": (b, 3, 224, 224)}),
        Spec("BERT-base, 128 tokens", bert, tokens,
             [("heads+FFN 30%", {"heads": 0.3, "ffn": 0.3}), ("heads+FFN 50%", {"heads": 0.5, "ffn": 0.5}),
              ("2 of 12 layers", {"layers": 2})],
             lambda b: {"input_ids": (b, 128), "attention_mask": (b, 128)}),
    ]


class Table:
    """Rows printed and written to the results file as they come (a run stopped midway keeps its rows)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115 - closed in main()

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _ratio_cells(ideal: float | None, dense_ms: float, ms: float) -> str:
    speed = dense_ms / ms
    if ideal is None:
        return f"{dense_ms:9.2f} {ms:9.2f} {speed:7.2f}x {'':>6} {'':>4}"
    quotient = speed / ideal
    return f"{dense_ms:9.2f} {ms:9.2f} {speed:7.2f}x {quotient:6.2f} {'ok' if quotient >= GOAL else 'low':>4}"


def _header(table: Table, backend_width: int = 10) -> None:
    table.add(f"{'model':<22} {'pruning':<15} {'batch':>5} {'backend':<{backend_width}} {'FLOPs':>7} {'ideal':>6} "
              f"{'dense ms':>9} {'ms':>9} {'speed-up':>8} {'r/i':>6} {'goal':>4}")


def _providers(names: str, tmp: str) -> list[tuple[str, list[Any]]]:
    """(label, ORT provider list) for each requested provider that this onnxruntime has."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = []
    for short in [n.strip() for n in names.split(",") if n.strip()]:
        full = PROVIDERS.get(short, short)
        if full not in available:
            print(f"(onnxruntime has no {full}; skipped. Available: {sorted(available)})")
            continue
        if full == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True, "trt_sparsity_enable": True, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": os.path.join(tmp, "ort_trt_cache")}
            chosen.append(("ort-trt", [(full, opts), "CUDAExecutionProvider", "CPUExecutionProvider"]))
        elif full == "CUDAExecutionProvider":
            chosen.append(("ort-cuda", [full, "CPUExecutionProvider"]))
        else:
            chosen.append(("ort-cpu", [full]))
    return chosen


def _prune(spec: Spec, kw: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    model = spec.make()
    return model, sc.prune(model, spec.inputs(1), **kw)


def _sparsify_2_4(model: torch.nn.Module, inputs: Any) -> list[str]:
    """2:4 (magnitude) on every linear / conv whose input channels divide by 4, masks made permanent.

    The 3-channel stem cannot hold the pattern (TensorRT keeps such layers dense): it is named in ``ignore``.
    """
    ignore = tuple(name for name, mod in model.named_modules()
                   if isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and mod.weight.shape[1] % 4)
    result = sc.PassManager([AnalyzeDependencies(), SparsifyWeights(nm=(2, 4), ignore=ignore)])(
        sc.capture(model, inputs))
    remove_masks(model)
    record = result.record(SparsityRecord)
    return [name for name, _ in record.layers] if record is not None else []


class _Session:
    """One ONNX Runtime session with its feeds, timed one run at a time."""

    def __init__(self, path: str, inputs: Any, providers: list[Any]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(path, opts, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        values = list(inputs) if isinstance(inputs, tuple) else [inputs[n] for n in names]
        self.feeds = {n: v.numpy() for n, v in zip(names, values, strict=True)}

    def once(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        return time.perf_counter() - start


def _paired_ms(dense: _Session, pruned: _Session, runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of both, their runs interleaved (alternating which goes first) so that load from other
    processes on a shared machine hits both alike."""
    for _ in range(warmup):
        dense.once()
        pruned.once()
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        if i % 2:
            b.append(pruned.once())
            a.append(dense.once())
        else:
            a.append(dense.once())
            b.append(pruned.once())
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b)


def run_onnxruntime(specs: list[Spec], batches: list[int], providers: list[tuple[str, list[Any]]], runs: int,
                    tmp: str, table: Table) -> None:
    """Dense vs pruned ONNX files, timed with every provider at every batch size (dense and pruned interleaved)."""
    table.add(f"ONNX Runtime, 2 threads, median of {runs} interleaved runs of dense and pruned; "
              f"torch {torch.__version__}")
    table.add()
    _header(table)
    for spec in specs:
        dense = spec.make()
        dense_path = str(export_onnx(dense, spec.inputs(1), os.path.join(tmp, "dense.onnx"), atol=1e-3,
                                     rtol=1e-2).path)
        for desc, kw in spec.settings:
            pruned, report = _prune(spec, kw)
            path = str(export_onnx(pruned, spec.inputs(1), os.path.join(tmp, "pruned.onnx"), atol=1e-3,
                                   rtol=1e-2).path)
            ideal = report.flops_before / report.flops_after
            for b in batches:
                for p, prov in providers:
                    dense_ms, ms = _paired_ms(_Session(dense_path, spec.inputs(b), prov),
                                              _Session(path, spec.inputs(b), prov), runs)
                    table.add(f"{spec.label:<22} {desc:<15} {b:>5} {p:<10} {-100 * report.flop_ratio:6.1f}% "
                              f"{ideal:5.2f}x {_ratio_cells(ideal, dense_ms, ms)}")


def _torch_cuda_ms(model: torch.nn.Module, inputs: Any, runs: int) -> float:
    model = copy.deepcopy(model).half().cuda().eval()
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    args = tuple(a.cuda().half() if a.is_floating_point() else a.cuda() for a in args)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    times = []
    with torch.inference_mode():
        for i in range(runs + 5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(*args, **kwargs)
            end.record()
            end.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def _variants(spec: Spec, names: list[str]) -> list[tuple[str, torch.nn.Module, float | None, list[str]]]:
    """(description, model, ideal speed-up, 2:4 layers) for each requested variant: dense, 2:4, 30%, 50%, depth."""
    out: list[tuple[str, torch.nn.Module, float | None, list[str]]] = []
    for name in ["dense"] + [n for n in names if n != "dense"]:  # the others are compared with dense
        if name == "dense":
            out.append(("dense", spec.make(), 1.0, []))
        elif name == "2:4":
            model = spec.make()
            out.append(("2:4 sparse", model, None, _sparsify_2_4(model, spec.inputs(1))))
        else:
            index = {"30%": 0, "50%": 1, "depth": 2}[name]
            desc, kw = spec.settings[index]
            model, report = _prune(spec, kw)
            out.append((desc, model, report.flops_before / report.flops_after, []))
    return out


def run_gpu(specs: list[Spec], batches: list[int], variants: list[str], runs: int, tmp: str, table: Table) -> None:
    """PyTorch CUDA FP16 and (with TensorRT) FP16 engines: dense vs 2:4 sparse vs pruned."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        trt = None
        table.add(f"(TensorRT not available: {exc}; PyTorch CUDA rows only)")
    from secateurs.backends.tensorrt import build_engine, engine_latency, run_engine

    table.add(f"GPU: {torch.cuda.get_device_name()}, FP16, median of {runs} runs; torch {torch.__version__}"
              + (f", TensorRT {trt.__version__}" if trt is not None else ""))
    table.add("TensorRT engines have one profile (batch 1..max, tuned for the largest batch).")
    table.add()
    _header(table, 12)
    sparse_notes = []
    for spec in specs:
        dense_ms: dict[tuple[int, str], float] = {}
        for desc, model, ideal, nm_layers in _variants(spec, variants):
            rows: dict[tuple[int, str], float] = {}
            for b in batches:
                rows[b, "torch-cuda"] = _torch_cuda_ms(model, spec.inputs(b), runs)
            if trt is not None:
                hi = max(batches)
                onnx_path = os.path.join(tmp, "trt.onnx")
                fp16_flag = hasattr(trt.BuilderFlag, "FP16")
                # TensorRT 11 has no FP16 flag: precision must come from the file (verified as FP32 above)
                export_onnx(model, spec.inputs(1), onnx_path, atol=1e-3, rtol=1e-2,
                            dtype=None if fp16_flag else torch.float16, verify=fp16_flag)
                start = time.perf_counter()
                built = build_engine(onnx_path, os.path.join(tmp, "m.engine"), fp16=True, sparse=desc == "2:4 sparse",
                                     min_shapes=spec.trt_shapes(1), opt_shapes=spec.trt_shapes(hi),
                                     max_shapes=spec.trt_shapes(hi), timing_cache=os.path.join(tmp, "cache"))
                err = _engine_error(run_engine(built.path, spec.inputs(1)), model, spec.inputs(1))
                if desc == "2:4 sparse":
                    sparse_notes.append(f"{spec.label}: {len(nm_layers)} layers made 2:4; TensorRT found "
                                        f"{len(built.sparse_eligible)} eligible and ran {len(built.sparse_layers)} "
                                        f"sparse: {', '.join(built.sparse_layers[:8]) or '-'}")
                sparse_notes.append(f"{spec.label} {desc}: engine built in {time.perf_counter() - start:.0f} s, "
                                    f"max rel. error vs PyTorch FP32 {err:.2g}")
                for b in batches:
                    rows[b, "trt-fp16"] = engine_latency(built.path, spec.inputs(b), warmup=10, runs=runs)
            for (b, backend), ms in rows.items():
                if desc == "dense":
                    dense_ms[b, backend] = ms
                flops = f"{100 * (1 / ideal - 1):6.1f}%" if ideal else f"{'':>7}"
                ideal_cell = f"{ideal:5.2f}x" if ideal else f"{'-':>6}"
                table.add(f"{spec.label:<22} {desc:<15} {b:>5} {backend:<12} {flops} {ideal_cell} "
                          f"{_ratio_cells(ideal, dense_ms[b, backend], ms)}")
    if sparse_notes:
        table.add()
        for note in sparse_notes:
            table.add(note)


def _engine_error(outputs: dict[str, torch.Tensor], model: torch.nn.Module, inputs: Any) -> float:
    """Largest error of the engine's first output against PyTorch FP32, relative to the output's magnitude."""
    with torch.no_grad():
        ref = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    want = next(t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)).float()
    got = next(iter(outputs.values())).float().cpu()
    if got.shape != want.shape:
        return float("nan")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--providers", default="cpu", help="ONNX Runtime providers: cpu, cuda, trt (comma-separated)")
    parser.add_argument("--gpu", action="store_true", help="GPU rows only (PyTorch CUDA, TensorRT engines)")
    parser.add_argument("--variants", default="dense,2:4,30%,50%,depth", help="GPU variants to build and time")
    parser.add_argument("--models", default="resnet,bert", help="which models: resnet, bert")
    parser.add_argument("--out", default=RESULTS, help="results file (the printed table)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    batches = [int(b) for b in args.batches.split(",")]
    wanted = {m.strip() for m in args.models.split(",")}
    specs = [s for s in _specs() if s.label.split("-")[0].lower() in wanted]
    table = Table(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.gpu:
            run_onnxruntime(specs, batches, _providers(args.providers, tmp), args.runs, tmp, table)
        gpu_ready = torch.cuda.is_available()
        if args.gpu and not gpu_ready:
            table.add("no CUDA GPU (torch.cuda.is_available() is False): no GPU rows")
        elif args.gpu or (gpu_ready and _has_tensorrt()):
            if not args.gpu:
                table.add()
            run_gpu(specs, batches, [v.strip() for v in args.variants.split(",")], args.runs, tmp, table)
    table.add()
    table.add(f"r/i = realized speed-up / ideal (FLOP ratio); goal: r/i >= {GOAL}. 2:4 rows have no FLOP ideal "
              "(2x on the sparse layers' math at best).")
    table.file.close()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


if __name__ == "__main__":
    main()
