"""Calibration data: tokenised batches from a text file, a JSONL file or Python's bundled documentation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from secateurs.errors import BudgetError, RecoveryError

__all__ = ["TextBatches", "doc_paragraphs", "read_texts", "self_generated_batches", "split_held_out", "text_batches",
           "with_labels"]


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


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    """The ``"text"`` field of one JSONL line, or an error naming the file and line."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise BudgetError(f"'{path}' line {lineno} is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise BudgetError(f"'{path}' line {lineno} has no string field 'text'")
    return str(obj["text"])


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
            texts.append(_jsonl_text(line, p, lineno))
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


class TextBatches:
    """Tokenised batches of a text or JSONL file, read from disk when indexed (a map-style dataset).

    The file is read once, line by line, to find where its texts start and end (a ``.jsonl`` file's ``"text"``
    fields, a plain file's blank-line paragraphs: the texts of :func:`read_texts`); only those offsets stay in
    memory. ``batches[i]`` reads and tokenises the ``i``-th ``batch_size`` texts, exactly as
    :func:`text_batches` does, so a corpus larger than memory can feed :class:`~secateurs.passes.Recover`
    (``torch.utils.data.Subset(batches, range(a, b))`` makes lazy training / held-out parts).

    Args:
        path: A ``.jsonl`` file (one JSON object with a string ``"text"`` per line) or a plain text file.
        tokenizer: A Hugging Face tokenizer.
        seq_len: Truncation length in tokens.
        batch_size: Texts per batch.
        labels: Add causal-LM ``labels`` (as :func:`with_labels`).
        min_chars: Texts shorter than this (after folding whitespace) are skipped.

    Raises:
        BudgetError: The file is missing, unreadable, malformed (naming the line) or holds no text.

    """

    def __init__(self, path: str | os.PathLike[str], tokenizer: Any, *, seq_len: int = 128, batch_size: int = 8,
                 labels: bool = False, min_chars: int = 1) -> None:
        if batch_size < 1 or seq_len < 2:
            raise BudgetError("batch_size must be >= 1 and seq_len >= 2")
        self.path, self.tokenizer, self.seq_len, self.batch_size, self.labels = Path(path), tokenizer, seq_len, \
            batch_size, labels
        self.jsonl = self.path.suffix == ".jsonl"
        self.spans: list[tuple[int, int]] = []
        try:
            with open(self.path, "rb") as f:
                self._index(f, min_chars)
        except OSError as exc:
            raise BudgetError(f"cannot read calibration text '{self.path}': {exc}") from exc
        if not self.spans:
            raise BudgetError(f"calibration file '{self.path}' holds no text")
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token

    def _text(self, raw: bytes, lineno: int) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BudgetError(f"cannot read calibration text '{self.path}' line {lineno}: {exc}") from exc
        if not self.jsonl:
            return " ".join(text.split())
        return _jsonl_text(text, self.path, lineno)

    def _index(self, f: Any, min_chars: int) -> None:
        start, first, lineno, offset = None, 0, 0, 0
        while True:
            line = f.readline()
            lineno += 1
            if self.jsonl:
                if line.strip() and len(self._text(line, lineno)) >= min_chars:
                    self.spans.append((offset, offset + len(line)))
            elif line in (b"\n", b"\r\n") or not line:  # a paragraph ends at an empty line or at the end
                if start is not None and len(self._text(self._read(f, start, offset), first)) >= min_chars:
                    self.spans.append((start, offset))
                start = None
            elif start is None:
                start, first = offset, lineno
            if not line:
                return
            offset += len(line)

    @staticmethod
    def _read(f: Any, start: int, end: int) -> bytes:
        here = f.tell()
        f.seek(start)
        raw = f.read(end - start)
        f.seek(here)
        return bytes(raw)

    def texts(self, index: int) -> list[str]:
        """The texts of batch ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        spans = self.spans[index * self.batch_size:(index + 1) * self.batch_size]
        with open(self.path, "rb") as f:
            return [self._text(self._read(f, a, b), 0) for a, b in spans]

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.spans) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index``: ``input_ids``, ``attention_mask`` (and ``labels``)."""
        enc = self.tokenizer(self.texts(index), padding=True, truncation=True, max_length=self.seq_len,
                             return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return with_labels([batch])[0] if self.labels else batch


def split_held_out(items: list[Any], fraction: float = 0.1) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: the last ``fraction`` of ``items`` (at least one) held out, order kept.

    Raises:
        BudgetError: ``fraction`` is outside (0, 1) or there are fewer than two items.

    """
    if not 0.0 < fraction < 1.0:
        raise BudgetError(f"held-out fraction must be in (0, 1), got {fraction!r}")
    if len(items) < 2:
        raise BudgetError(f"cannot split {len(items)} item(s) into training and held-out parts")
    cut = min(len(items) - 1, max(1, int(round(len(items) * (1 - fraction)))))
    return list(items[:cut]), list(items[cut:])


def with_labels(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches: each batch plus ``labels`` (its ``input_ids``, -100 where ``attention_mask`` is 0)."""
    out = []
    for batch in batches:
        labels = batch["input_ids"].clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels[mask == 0] = -100
        out.append({**batch, "labels": labels})
    return out


def self_generated_batches(
    teacher: Any,
    tokenizer: Any,
    n: int,
    seq_len: int,
    seed: int = 0,
    *,
    batch_size: int = 8,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Training batches sampled from a causal LM's own ``generate()`` (data-free recovery).

    Every sequence starts at the tokenizer's BOS token (else the model config's, else token 0) and is
    sampled to exactly ``seq_len`` tokens; batches hold ``input_ids``, ``attention_mask`` and ``labels``.

    Args:
        teacher: A causal LM with ``generate`` (the dense model).
        tokenizer: Its tokenizer (for the BOS / pad ids), or None.
        n: Number of sequences.
        seq_len: Tokens per sequence (at least 2).
        seed: Sampling seed (the caller's random state is left as it was).
        batch_size: Sequences per batch.
        temperature: Sampling temperature.
        top_k: Sample from the ``top_k`` most likely tokens only (None: all).

    Raises:
        RecoveryError: The model cannot generate, or ``n`` / ``seq_len`` / ``batch_size`` are too small.

    """
    if n < 1 or seq_len < 2 or batch_size < 1:
        raise RecoveryError(f"self-generated data needs n >= 1, seq_len >= 2, batch_size >= 1; got {n}, {seq_len}, "
                            f"{batch_size}")
    if not callable(getattr(teacher, "generate", None)):
        raise RecoveryError(f"{type(teacher).__name__} has no generate(); self-generated data needs a causal LM")
    config = getattr(teacher, "config", None)
    start = next((v for v in (getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None))
                  if isinstance(v, int)), 0)
    pad = next((v for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                            getattr(config, "eos_token_id", None)) if isinstance(v, int)), start)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    batches = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
                ids = teacher.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                       max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                       temperature=temperature, top_k=top_k if top_k is not None else 0,
                                       pad_token_id=pad)
                ids = ids[:, :seq_len].cpu()
                batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    finally:
        teacher.train(was_training)
    return batches
