"""Frontends: capture models into the IR."""

from secateurs.frontends.torch_export import capture, capture_call, split_inputs

__all__ = ["capture", "capture_call", "split_inputs"]
