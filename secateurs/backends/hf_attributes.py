"""Moved to :mod:`secateurs.modeling.hf_attributes`; kept as an alias."""

from secateurs.modeling.hf_attributes import *  # noqa: F403
from secateurs.modeling.hf_attributes import __all__  # noqa: F401
