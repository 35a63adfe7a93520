"""Checkpoint-to-checkpoint pruning for the command line: load, calibrate, prune, save, report.

The CLI (``secateurs prune`` / ``secateurs inspect``) only parses flags and prints; this module assembles the
frontend, passes and backends and writes ``DST`` (the checkpoint, tokenizer files and ``report.json``) through
:func:`secateurs.save_pretrained`, so ``DST`` is complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from secateurs.api import Report, prune
from secateurs.backends.checkpoint import TOKENIZER_FILES, load_pretrained, save_pretrained
from secateurs.errors import BudgetError, CheckpointError

__all__ = ["example_and_calib", "inspect_checkpoint", "prune_checkpoint", "report_dict"]


def _tokenizer(src: Path) -> Any:
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def example_and_calib(model: Any, src: Path, calib: str | None, samples: int, seq_len: int,
                      seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """Example inputs and calibration batches for a text model.

    With a tokenizer in ``src``: the calibration text (``"pydoc"`` or a ``.txt`` / ``.jsonl`` file) tokenised.
    Without one: random token ids below the vocabulary size (no calibration unless ``calib`` is given, which
    then needs a tokenizer).
    """
    from secateurs.data import text_batches

    tokenizer = _tokenizer(src)
    if tokenizer is None:
        if calib not in (None, "none"):
            raise BudgetError(f"'{src}' has no tokenizer files, so --calib {calib} cannot be tokenised")
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise BudgetError(f"'{src}' has neither a tokenizer nor a vocab_size to build example inputs from")
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (2, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None
    batches = text_batches(tokenizer, "pydoc" if calib in (None, "pydoc") else calib, samples=samples,
                           seq_len=seq_len, batch_size=min(8, samples))
    for batch in batches:
        batch.pop("token_type_ids", None)
    example = {k: v[:2] for k, v in batches[0].items()}
    return example, (batches if calib not in ("none",) else None)


def report_dict(report: Report, options: dict[str, Any], src: Path) -> dict[str, Any]:
    """The JSON report: sizes, every pruned / frozen group with its reason, options and versions."""
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
        "changes": plain(report.changes),
        "frozen": plain(report.frozen),
        "depth": plain(report.depth),
        "experts": plain(report.experts),
        "sparsity": plain(report.sparsity),
        "unsupported_ops": report.unsupported_ops,
        "retries": report.retries,
        "latency_before": report.latency_before,
        "latency_after": report.latency_after,
        "options": options,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def prune_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, *, calib: str | None = "pydoc",
                     samples: int = 16, seq_len: int = 64, seed: int = 0, overwrite: bool = False,
                     dry_run: bool = False, trust_remote_code: bool = False,
                     **options: Any) -> tuple[Report, dict[str, Any]]:
    """Prune the checkpoint in ``src`` with :func:`secateurs.prune` ``options`` and save it to ``dst``.

    ``dry_run`` plans and reports on an in-memory copy and writes nothing. Returns the report and its JSON.

    Raises:
        CheckpointError: ``src`` is missing or unreadable, or ``dst`` exists without ``overwrite``.
        BudgetError: Options or calibration are invalid.

    """
    source = Path(src)
    if not source.is_dir():
        raise CheckpointError(f"source '{source}' is not a checkpoint folder")
    if dst is not None and Path(dst).exists() and not overwrite and not dry_run:
        raise CheckpointError(f"output folder '{dst}' exists; pass --overwrite to replace it")
    if not dry_run and dst is None:
        raise BudgetError("an output folder is required (or --dry-run)")
    torch.manual_seed(seed)
    model = load_pretrained(source, trust_remote_code=trust_remote_code)
    example, batches = example_and_calib(model, source, calib, samples, seq_len, seed)
    report = prune(model, example, calib=batches, **options)
    if report.sparsity is not None:
        from secateurs.passes.sparsity import remove_masks

        remove_masks(model)
    data = report_dict(report, {**options, "calib": calib, "samples": samples, "seq_len": seq_len,
                                "seed": seed}, source)
    if dry_run:
        return report, data
    assert dst is not None
    out = Path(dst)
    save_pretrained(model, out, source=source, overwrite=overwrite)
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".json", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, out / "report.json")
    return report, data


def inspect_checkpoint(src: str | os.PathLike[str], *, seq_len: int = 16, seed: int = 0,
                       trust_remote_code: bool = False) -> dict[str, Any]:
    """The dependency groups of a checkpoint: each group's kind and size, each frozen group's reason."""
    from secateurs.frontends.torch_export import capture
    from secateurs.ir.cost import count_flops
    from secateurs.ir.depgraph import analyze

    source = Path(src)
    if not source.is_dir():
        raise CheckpointError(f"source '{source}' is not a checkpoint folder")
    model = load_pretrained(source, trust_remote_code=trust_remote_code)
    example, _ = example_and_calib(model, source, "none", 2, seq_len, seed)
    graph = capture(model, example)
    info = analyze(graph)
    return {
        "params": graph.param_count(),
        "flops": count_flops(graph),
        "groups": [{"name": g.name, "kind": g.kind, "size": g.size, "params_per_channel": g.params_per_channel}
                   for g in info.iter_groups()],
        "frozen": [{"members": list(f.members), "size": f.size, "reason": f.reason} for f in info.frozen],
        "unsupported_ops": info.unsupported,
    }

