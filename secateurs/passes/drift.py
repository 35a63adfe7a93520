"""The end-of-pipeline check: the pruned model runs, its outputs keep their shapes, and how far they moved.

:func:`snapshot_outputs` records the dense model's outputs on the example inputs before a pipeline;
:func:`measure_drift` runs the pruned model on the same inputs afterwards. A changed output shape is a
:class:`~secateurs.errors.VerificationError` (a pruned model must be a drop-in replacement); the drift figures
(cosine similarity and relative error of every floating output) go into the report, and a user threshold on
them turns excessive drift into an error too (:func:`check_drift`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from secateurs.errors import BudgetError, VerificationError
from secateurs.modeling.outputs import snapshot_outputs

__all__ = ["OutputDrift", "check_drift", "check_thresholds", "measure_drift", "snapshot_outputs"]


@dataclasses.dataclass(frozen=True)
class OutputDrift:
    """How far the pruned model's outputs moved from the dense model's on the example inputs.

    Attributes:
        outputs: Number of floating-point output tensors compared.
        cosine: Smallest cosine similarity between a flattened dense and pruned output (1.0 = same direction).
        rel_error: Largest ``||pruned - dense|| / ||dense||`` over the outputs.
        max_abs_error: Largest absolute element difference.

    """

    outputs: int
    cosine: float
    rel_error: float
    max_abs_error: float

    def __str__(self) -> str:
        """One report line."""
        return (f"output drift on the example inputs: cosine {self.cosine:.4f}, relative error {self.rel_error:.4f}"
                f" (max abs {self.max_abs_error:.3g}) over {self.outputs} output(s)")


def measure_drift(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                  dense: list[torch.Tensor]) -> OutputDrift:
    """Run the pruned ``model`` and compare its outputs with the ``dense`` snapshot.

    Raises:
        VerificationError: The model fails to run, or an output's count, shape or dtype changed.

    """
    try:
        pruned = snapshot_outputs(model, args, kwargs)
    except Exception as exc:  # any failure of the rewritten model is a verification failure
        raise VerificationError(f"the pruned model no longer runs on the example inputs: {exc}") from exc
    if any(not bool(torch.isfinite(t).all()) for t in dense if t.is_floating_point()):
        raise VerificationError("the dense model's own outputs contain NaN or infinity on the example inputs; "
                                "the drift of the pruned model cannot be measured")
    if len(pruned) != len(dense):
        raise VerificationError(f"the pruned model returns {len(pruned)} tensors, the dense one {len(dense)}")
    cosines, rels, abses = [], [], []
    for i, (a, b) in enumerate(zip(dense, pruned, strict=True)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise VerificationError(f"output #{i} changed from {tuple(a.shape)} {a.dtype} to {tuple(b.shape)} "
                                    f"{b.dtype}: the pruned model is not a drop-in replacement")
        if not a.is_floating_point() or a.numel() == 0:
            continue
        x, y = a.double().reshape(-1), b.double().reshape(-1)
        na, nb = float(x.norm()), float(y.norm())
        cos = float(x @ y) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        cosines.append(cos)
        rels.append(float((y - x).norm()) / na if na > 0 else float((y - x).norm()))
        abses.append(float((y - x).abs().max()))
    if any(not math.isfinite(v) for v in rels + abses):
        raise VerificationError("the pruned model's outputs contain NaN or infinity on the example inputs")
    return OutputDrift(len(cosines), min(cosines, default=1.0), max(rels, default=0.0), max(abses, default=0.0))


def check_thresholds(min_cosine: float | None = None, max_rel_error: float | None = None) -> None:
    """Refuse thresholds that could never or always pass (NaN would silently switch the check off).

    Raises:
        BudgetError: ``min_cosine`` outside [-1, 1] or ``max_rel_error`` negative, infinite or NaN.

    """
    if min_cosine is not None and not (isinstance(min_cosine, (int, float)) and -1.0 <= min_cosine <= 1.0):
        raise BudgetError(f"min_cosine must be a cosine in [-1, 1], got {min_cosine!r}")
    if max_rel_error is not None and not (isinstance(max_rel_error, (int, float)) and 0.0 <= max_rel_error < math.inf):
        raise BudgetError(f"max_rel_error must be a finite number >= 0, got {max_rel_error!r}")


def check_drift(drift: OutputDrift, *, min_cosine: float | None = None, max_rel_error: float | None = None) -> None:
    """Refuse a pruned model whose drift passes the user's threshold.

    Raises:
        VerificationError: ``drift.cosine < min_cosine`` or ``drift.rel_error > max_rel_error`` (the message
            gives the measured figure and the threshold).
        BudgetError: A threshold is out of range (see :func:`check_thresholds`).

    """
    check_thresholds(min_cosine, max_rel_error)
    if min_cosine is not None and drift.cosine < min_cosine:
        raise VerificationError(f"output cosine {drift.cosine:.4f} is below the threshold {min_cosine} ({drift})")
    if max_rel_error is not None and drift.rel_error > max_rel_error:
        raise VerificationError(f"output relative error {drift.rel_error:.4f} exceeds the threshold "
                                f"{max_rel_error} ({drift})")
