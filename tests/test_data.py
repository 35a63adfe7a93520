"""Calibration data helpers."""

import json

import pytest

from secateurs.data import TextBatches, doc_paragraphs, read_texts, text_batches
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


def test_text_batches_from_disk_equal_the_in_memory_ones(tmp_path):
    """Paragraphs split by blank lines (CRLF, runs of blank lines, whitespace-only lines inside a paragraph)
    and JSONL records: indexed lazily, the same batches as text_batches."""
    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"one two three\nfour\n\n\n\nfive six\r\n\r\nseven  eight\n \nnine\n\nx\n\n")
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ("a bb ccc", "dddd", "ee ff", "g")) + "\n\n")
    for path, min_chars in ((txt, 1), (txt, 3), (jl, 1)):
        lazy = TextBatches(path, ToyTokenizer(), seq_len=4, batch_size=2, min_chars=min_chars)
        texts = read_texts(path, min_chars=min_chars)
        eager = text_batches(ToyTokenizer(), texts, samples=len(texts), seq_len=4, batch_size=2)
        assert len(lazy) == len(eager)
        assert [t for i in range(len(lazy)) for t in lazy.texts(i)] == texts
        for i, batch in enumerate(eager):
            for k, v in batch.items():
                assert lazy[i][k].tolist() == v.tolist(), (path, i, k)
    labelled = TextBatches(txt, ToyTokenizer(), seq_len=4, batch_size=2, labels=True)[0]
    assert (labelled["labels"][labelled["attention_mask"] == 0] == -100).all()
    with pytest.raises(IndexError):
        TextBatches(txt, ToyTokenizer(), batch_size=2)[99]
    lazy = TextBatches(txt, ToyTokenizer(), batch_size=2)
    txt.write_bytes(txt.read_bytes().upper())  # same offsets, other text: batches are read when indexed
    assert lazy.texts(0) == ["ONE TWO THREE FOUR", "FIVE SIX"]


def test_text_batches_refuse_bad_files_naming_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(BudgetError, match="line 2 is not JSON"):
        TextBatches(bad, ToyTokenizer())
    with pytest.raises(BudgetError, match="cannot read"):
        TextBatches(tmp_path / "missing.txt", ToyTokenizer())
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(BudgetError, match="holds no text"):
        TextBatches(tmp_path / "empty.txt", ToyTokenizer())
