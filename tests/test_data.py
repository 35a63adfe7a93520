"""Calibration data helpers."""

import json

import pytest

from secateurs.data import doc_paragraphs, read_texts, text_batches
from secateurs.errors import BudgetError


class ToyTokenizer:
    pad_token = "[PAD]"

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        import torch

        ids = [[len(w) for w in t.split()][:max_length] for t in texts]
        n = max(len(i) for i in ids)
        mask = [[1] * len(i) + [0] * (n - len(i)) for i in ids]
        ids = [i + [0] * (n - len(i)) for i in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def test_pydoc_paragraphs_are_real_text():
    paras = doc_paragraphs(5)
    assert len(paras) == 5 and all(len(p) >= 200 for p in paras)


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph here\n\nsecond one\n")
    assert read_texts(txt) == ["first paragraph here", "second one"]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": "more"}) + "\n")
    batches = text_batches(ToyTokenizer(), jl, samples=10, seq_len=4, batch_size=1)
    assert len(batches) == 2 and batches[0]["input_ids"].tolist() == [[5, 5]]


def test_bad_calibration_files_are_refused(tmp_path):
    with pytest.raises(BudgetError, match="cannot read"):
        read_texts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(BudgetError, match="line 1"):
        read_texts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BudgetError, match="no text"):
        read_texts(empty)
