"""The parts of recovery training (:class:`secateurs.passes.Recover`): options, LoRA, losses, teacher, checkpoints."""
