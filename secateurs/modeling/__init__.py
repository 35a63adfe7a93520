"""Torch-level model knowledge below the passes.

The module rewrite engine, MoE structure, the modules pruning inserts, and running a model to compare outputs.
Passes and exporters import it; it imports neither.
"""
