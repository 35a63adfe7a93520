"""secateurs: a compiler for pruning neural networks.

Capture a model into a graph IR, analyse its coupled channels, prune with passes, and rewrite the module.
"""

from secateurs import data, passes, report
from secateurs.api import Report, prune
from secateurs.backends.checkpoint import SaveResult, load_pretrained, save_pretrained
from secateurs.errors import (
    BackendUnavailableError,
    BudgetError,
    CaptureError,
    CheckpointError,
    PassContractError,
    RecipeError,
    RecoveryError,
    SecateursError,
    UnsupportedOpError,
    VerificationError,
)
from secateurs.frontends.torch_export import capture
from secateurs.ir.graph import Graph
from secateurs.passes.base import PassManager

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "CaptureError",
    "CheckpointError",
    "Graph",
    "PassContractError",
    "RecipeError",
    "RecoveryError",
    "PassManager",
    "Report",
    "SaveResult",
    "SecateursError",
    "UnsupportedOpError",
    "VerificationError",
    "__version__",
    "capture",
    "data",
    "load_pretrained",
    "passes",
    "prune",
    "report",
    "save_pretrained",
]
