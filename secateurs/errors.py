"""Typed errors raised by secateurs.

Every error names the node, op, parameter or file at fault so the user can act on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "CaptureError",
    "CheckpointError",
    "MemoryShortfall",
    "PassContractError",
    "RecipeError",
    "RecoveryError",
    "SecateursError",
    "UnsupportedOpError",
    "VerificationError",
    "did_you_mean",
]


class SecateursError(Exception):
    """Base class of every error secateurs raises on purpose."""


class CaptureError(SecateursError):
    """The model could not be captured into the IR (torch.export failed or inputs are malformed)."""


class UnsupportedOpError(SecateursError):
    """An op rule was registered or applied incorrectly."""


class BudgetError(SecateursError):
    """A pruning target is invalid (ratio outside [0, 1), unknown target kind) or cannot be met."""


class RecipeError(BudgetError):
    """A recipe file is malformed: unknown pass, bad option or value, or a pass whose inputs are missing."""


class VerificationError(SecateursError):
    """A rewritten model does not behave as the plan predicted; the model was restored."""


class CheckpointError(SecateursError):
    """A checkpoint file is missing, corrupt or does not match its configuration."""


class MemoryShortfall(CheckpointError):
    """Loading a checkpoint in memory cannot fit; raised before anything is allocated.

    ``reason`` says how much the load needs and how much is available (the message adds what to do instead).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PassContractError(SecateursError):
    """A pass ran without what it requires, or broke an invariant it guarantees."""


class BackendUnavailableError(SecateursError):
    """A backend's runtime is missing: its package is not installed or the machine has no suitable device."""


class RecoveryError(SecateursError):
    """Recovery training cannot run: no data, an unknown option value, or a teacher whose outputs do not match."""


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the closest of ``choices`` to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), list(choices), n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
