"""Backends: physically rewrite modules (and, later, export them)."""

from secateurs.modeling.rewrite import Snapshot, apply_keep, check_module_attributes

__all__ = ["Snapshot", "apply_keep", "check_module_attributes"]
