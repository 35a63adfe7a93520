"""Measured latency tables; the implementation lives below the passes, in :mod:`secateurs.modeling.latency`.

This import path is kept for users (``from secateurs.backends.latency import LatencyTable``).
"""

from secateurs.modeling.latency import BACKENDS, LatencyTable, default_cache

__all__ = ["BACKENDS", "LatencyTable", "default_cache"]
