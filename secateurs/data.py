"""Calibration data: tokenised batches from a text file, a JSONL file or Python's bundled documentation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from secateurs.errors import BudgetError

__all__ = ["doc_paragraphs", "read_texts", "text_batches"]


def doc_paragraphs(count: int, min_chars: int = 200) -> list[str]:
    """The first ``count`` paragraphs of at least ``min_chars`` characters of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text) >= min_chars:
                out.append(text)
                if len(out) == count:
                    return out
    return out


def read_texts(path: str | os.PathLike[str], min_chars: int = 1) -> list[str]:
    """Texts from a file: a ``.jsonl`` file's ``"text"`` fields, or a plain file's blank-line paragraphs.

    Raises:
        BudgetError: The file is missing, unreadable or holds no text.

    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BudgetError(f"cannot read calibration text '{p}': {exc}") from exc
    texts: list[str] = []
    if p.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise BudgetError(f"'{p}' line {lineno} is not JSON: {exc}") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise BudgetError(f"'{p}' line {lineno} has no string field 'text'")
            texts.append(obj["text"])
    else:
        texts = [" ".join(par.split()) for par in raw.split("\n\n")]
    texts = [t for t in texts if len(t) >= min_chars]
    if not texts:
        raise BudgetError(f"calibration file '{p}' holds no text")
    return texts


def text_batches(
    tokenizer: Any,
    source: str | os.PathLike[str] | list[str] = "pydoc",
    *,
    samples: int = 32,
    seq_len: int = 128,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised calibration batches (dicts of ``input_ids`` and ``attention_mask``).

    Args:
        tokenizer: A Hugging Face tokenizer.
        source: ``"pydoc"`` (Python's bundled documentation), a file path (``.txt`` / ``.jsonl``) or a list
            of texts.
        samples: Number of texts.
        seq_len: Truncation length in tokens.
        batch_size: Texts per batch.

    Raises:
        BudgetError: No text, or fewer texts than one batch needs.

    """
    if samples < 1 or batch_size < 1 or seq_len < 2:
        raise BudgetError("samples and batch_size must be >= 1 and seq_len >= 2")
    if isinstance(source, list):
        texts = source[:samples]
    elif str(source) == "pydoc":
        texts = doc_paragraphs(samples)
    else:
        texts = read_texts(source)[:samples]
    if not texts:
        raise BudgetError("calibration data is empty")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
