"""Moved to :mod:`secateurs.modeling.rewrite` (the torch rewrite engine sits below the passes); kept as an alias."""

from secateurs.modeling.rewrite import *  # noqa: F403
from secateurs.modeling.rewrite import __all__  # noqa: F401
