"""Checkpoint-to-checkpoint pruning for the command line: load, calibrate, prune, save, report.

The CLI (``secateurs prune`` / ``secateurs inspect``) only parses flags and prints; this module assembles the
frontend, passes and backends and writes ``DST`` (the checkpoint, tokenizer files and ``report.json``) through
:func:`secateurs.save_pretrained`, so ``DST`` is complete or absent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.api import Report, run_passes
from secateurs.backends.checkpoint import (
    EXPERT_LAYOUTS,
    SAVE_FORMATS,
    TOKENIZER_FILES,
    check_reload,
    describe,
    load_pretrained,
    load_skeleton,
    save_pretrained,
    stores_per_expert,
)
from secateurs.backends.decilm import check_family, decilm_layout
from secateurs.backends.files import guard_source
from secateurs.errors import BudgetError, CheckpointError
from secateurs.passes.drift import check_drift, check_thresholds
from secateurs.progress import stage
from secateurs.recipe import Recipe, build_passes, parse_recipe
from secateurs.report import costs_by_layer, write_report

__all__ = ["example_and_calib", "flags_recipe", "inspect_checkpoint", "prune_checkpoint", "report_dict"]

log = logging.getLogger(__name__)


def _tokenizer(src: Path) -> Any:
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except Exception as exc:  # tokenizers raise JSON, OS and value errors for damaged files
        raise CheckpointError(f"the tokenizer files in '{src}' cannot be read: {type(exc).__name__}: {exc}") from exc


def example_and_calib(model: Any, src: Path, calib: str | None, samples: int, seq_len: int,
                      seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """Example inputs and calibration batches for a text model.

    With a tokenizer in ``src``: the calibration text (``"pydoc"`` or a ``.txt`` / ``.jsonl`` file) tokenised;
    with ``calib="none"`` the example is two tokenised documentation paragraphs and there is no calibration.
    Without one: random token ids below the vocabulary size, or random pixels for a vision model (no
    calibration unless ``calib`` is given, which then needs a tokenizer).
    """
    from secateurs.data import text_batches

    tokenizer = _tokenizer(src)
    if tokenizer is None:
        if calib not in (None, "none"):
            raise BudgetError(f"'{src}' has no tokenizer files, so --calib {calib} cannot be tokenised")
        from secateurs.bench import example_for

        config = getattr(model, "config", None)
        if not (getattr(config, "vocab_size", 0) or getattr(config, "num_channels", 0)):
            raise BudgetError(f"'{src}' has neither a tokenizer nor a vocab_size / image size to build example "
                              "inputs from")
        return example_for(model, 2, seq_len, seed), None
    none = calib == "none"
    batches = text_batches(tokenizer, "pydoc" if none or calib is None else calib, samples=2 if none else samples,
                           seq_len=seq_len, batch_size=2 if none else min(8, samples))
    for batch in batches:
        batch.pop("token_type_ids", None)
    example = {k: v[:2] for k, v in batches[0].items()}
    return example, (None if none else batches)


def report_dict(report: Report, options: dict[str, Any], src: Path, *, recipe: Recipe | None = None,
                quality: dict[str, float] | None = None) -> dict[str, Any]:
    """The JSON report: sizes per layer, every pruned / frozen group with its reason, recipe and versions."""
    import transformers

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {
        "source": str(src),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "flops_before": report.flops_before,
        "flops_after": report.flops_after,
        "layers": plain(report.layers),
        "changes": plain(report.changes),
        "frozen": plain(report.frozen),
        "depth": plain(report.depth),
        "experts": plain(report.experts),
        "sparsity": plain(report.sparsity),
        "allocation": plain(report.allocation),
        "unsupported_ops": report.unsupported_ops,
        "retries": report.retries,
        "width_criterion": report.width_criterion,
        "capture": report.capture,
        "verification": report.verification,
        "compensated_biases": report.compensated_biases,
        "drift": plain(report.drift),
        "recovery": plain(report.recovery),
        "passes": [{"pass": n, "seconds": round(t, 3)} for n, t in report.passes],
        "latency_before": report.latency_before,
        "latency_after": report.latency_after,
        "quality": quality or {},
        "options": options,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "versions": {"secateurs": _version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("secateurs")
    except PackageNotFoundError:
        return "unknown"


def flags_recipe(options: dict[str, Any], *, calib: str | None = "pydoc", samples: int = 16, seq_len: int = 64,
                 seed: int = 0) -> Recipe:
    """The one-step recipe (a ``prune`` step) that command-line flags stand for, validated."""
    return parse_recipe({"seed": seed, "calib": {"source": calib or "none", "samples": samples, "seq_len": seq_len},
                         "passes": [{"prune": options}]}, "flags")


def prune_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, recipe: Recipe | None = None,
                     *, calib: str | None = None, samples: int | None = None, seq_len: int | None = None,
                     seed: int | None = None, overwrite: bool = False, dry_run: bool = False, device: str = "cpu",
                     verify: bool = True, min_cosine: float | None = None, max_rel_error: float | None = None,
                     trust_remote_code: bool = False, expert_layout: str = "source", format: str = "hf",  # noqa: A002
                     **options: Any) -> tuple[Report, dict[str, Any]]:
    """Prune the checkpoint in ``src`` with a recipe (or :func:`secateurs.prune` ``options``) and save it to ``dst``.

    ``dst`` receives the checkpoint, tokenizer files, ``report.json``, ``report.html`` and the report's PNG plots,
    all at once (a temporary folder renamed into place). ``dry_run`` plans and reports on an in-memory copy and
    writes nothing. ``calib`` / ``samples`` / ``seq_len`` / ``seed`` override the recipe's. With ``verify`` the
    pruned model is run on the example inputs (output shapes must match; the drift goes into the report) and
    ``min_cosine`` / ``max_rel_error`` refuse a model that drifted further (nothing is written then). Returns
    the report and its JSON. ``expert_layout`` is how MoE experts are written: ``"source"`` (the layout ``src``
    stores them in, per-expert when the pruning allows plain ``from_pretrained``), ``"fused"`` or
    ``"per-expert"``. ``format`` is the checkpoint format: ``"hf"`` or ``"decilm"`` (Nemotron-NAS, per-layer sizes
    that serving engines load; Llama-family decoders; see :func:`secateurs.save_pretrained`).

    Raises:
        CheckpointError: ``src`` is missing or unreadable, or ``dst`` exists without ``overwrite``.
        BudgetError: Options or calibration are invalid (``RecipeError`` for a bad recipe).
        VerificationError: The pruned model changed its output shapes or drifted past a threshold.

    """
    if not verify and (min_cosine is not None or max_rel_error is not None):
        raise BudgetError("drift thresholds need the output check: drop --no-verify")
    check_thresholds(min_cosine, max_rel_error)
    if expert_layout not in ("source", *EXPERT_LAYOUTS):
        raise BudgetError(f"unknown expert layout {expert_layout!r}; choose source, {', '.join(EXPERT_LAYOUTS)}")
    if format not in SAVE_FORMATS:
        raise BudgetError(f"unknown checkpoint format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    source = Path(src)
    if not source.is_dir():
        raise CheckpointError(f"source '{source}' is not a checkpoint folder")
    if dst is not None:
        guard_source(source, dst, "--out")
    if dst is not None and Path(dst).exists() and not overwrite and not dry_run:
        raise CheckpointError(f"output folder '{dst}' exists; pass --overwrite to replace it")
    if not dry_run and dst is None:
        raise BudgetError("an output folder is required (or --dry-run)")
    if recipe is None:
        recipe = flags_recipe(options, calib=calib if calib is not None else "pydoc", samples=samples or 16,
                              seq_len=seq_len or 64, seed=seed or 0)
    elif options:
        raise BudgetError("give a recipe or pruning options, not both")
    calib = calib if calib is not None else recipe.calib.get("source", "pydoc")
    samples = samples or int(recipe.calib.get("samples", 16))
    seq_len = seq_len or int(recipe.calib.get("seq_len", 64))
    seed = recipe.seed if seed is None else seed
    torch.manual_seed(seed)
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise BudgetError(f"device '{device}' is not available here (torch.cuda.is_available() is False)"
                          if device.startswith("cuda") else f"unknown device '{device}'; use cpu or cuda")
    with stage("loading checkpoint"):
        model = load_pretrained(source, trust_remote_code=trust_remote_code).to(device)
    if format == "decilm":
        check_family(model)
    example, batches = example_and_calib(model, source, calib, samples, seq_len, seed)
    example = {k: v.to(device) for k, v in example.items()}
    if batches is not None:
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    passes = build_passes(recipe, model, calib=batches)
    from secateurs.passes.allocate import AllocateBudget

    allocators = [p for p in passes if isinstance(p, AllocateBudget) and p.latency is not None]
    report = run_passes(model, example, passes, check_outputs=verify,
                        latency=allocators[0].latency if allocators else None,
                        measure_latency=any(p.speedup is not None for p in allocators))
    if report.sparsity is not None:
        from secateurs.passes.sparsity import remove_masks

        remove_masks(model)
    data = report_dict(report, {"calib": calib, "samples": samples, "seq_len": seq_len, "seed": seed,
                                "device": device}, source, recipe=recipe)
    if report.drift is not None:
        check_drift(report.drift, min_cosine=min_cosine, max_rel_error=max_rel_error)
    layout_now = describe(model)
    try:
        decilm_layout(model)
        data["decilm_loadable"] = True
    except CheckpointError:
        if format == "decilm":  # what the format cannot express is refused before anything is written
            raise
        data["decilm_loadable"] = False
    data["plain_loadable"] = layout_now.plain_loadable
    data["loads_with"] = ("decilm" if format == "decilm" else
                          "from_pretrained" if layout_now.plain_loadable else "load_pretrained")
    from secateurs.distributed import is_writer

    if dry_run or not is_writer():  # under torchrun every rank made the same decisions; one writes
        return report, data
    assert dst is not None
    layout = _expert_layout(model, source, expert_layout)
    if layout is not None:
        data["expert_layout"] = layout
    with stage("saving checkpoint and report"):
        model = model.to("cpu")
        example = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in example.items()}

        def finish(tmp: Path) -> None:
            write_report(tmp, data)
            if verify:  # what is renamed into place must reload as the model that was verified
                check_reload(tmp, model, example, layout_now.plain_loadable and format == "hf",
                             trust_remote_code=trust_remote_code)

        save_pretrained(model, Path(dst), source=source, overwrite=overwrite, extra=finish,
                        expert_layout=layout["written"] if layout is not None else "fused", format=format)
    return report, data


def _expert_layout(model: nn.Module, source: Path, asked: str) -> dict[str, str] | None:
    """How the experts are written (``written``, and ``why``); None for a model without fused MoE experts."""
    from secateurs.passes.experts import find_moe_blocks

    if not find_moe_blocks(model):
        if asked == "per-expert":
            raise BudgetError(f"--expert-layout per-expert: {type(model).__name__} has no mixture-of-experts layer")
        return None
    if asked != "source":
        return {"written": asked, "why": "asked for"}
    if not stores_per_expert(source):
        return {"written": "fused", "why": "the source stores its experts fused"}
    if not describe(model).plain_loadable:
        log.warning("the source stores its experts one by one, but the per-expert layout loads with plain "
                    "from_pretrained only and this pruning needs secateurs.json (per-layer sizes or factorised layers): "
                    "writing the fused layout")
        return {"written": "fused", "why": "the source is per-expert, but the per-expert layout is read by plain "
                "from_pretrained only and this pruning has per-layer sizes or factorised layers"}
    return {"written": "per-expert", "why": "the source stores its experts one by one"}


def inspect_checkpoint(src: str | os.PathLike[str], *, seq_len: int = 16, seed: int = 0,
                       trust_remote_code: bool = False) -> dict[str, Any]:
    """The dependency groups of a checkpoint: each group's kind and size, each frozen group's reason.

    No weight is read: the model is built on the meta device (:func:`load_skeleton`) and one forward on meta
    example inputs is recorded, so a checkpoint far larger than memory is inspected in seconds.
    """
    from secateurs.frontends.torch_export import capture
    from secateurs.ir.aten_cost import count_flops
    from secateurs.ir.depgraph import analyze

    source = Path(src)
    if not source.is_dir():
        raise CheckpointError(f"source '{source}' is not a checkpoint folder")
    model = load_skeleton(source, trust_remote_code=trust_remote_code)
    example, _ = example_and_calib(model, source, "none", 2, seq_len, seed)
    graph = capture(model, {k: v.to("meta") for k, v in example.items()})
    info = analyze(graph)
    return {
        "layers": [{"name": k, "params": p, "flops": f} for k, (p, f) in costs_by_layer(graph).items()],
        "params": graph.param_count(),
        "flops": count_flops(graph),
        "groups": [{"name": g.name, "kind": g.kind, "size": g.size, "params_per_channel": g.params_per_channel}
                   for g in info.iter_groups()],
        "frozen": [{"members": list(f.members), "size": f.size, "reason": f.reason} for f in info.frozen],
        "unsupported_ops": info.unsupported,
    }

