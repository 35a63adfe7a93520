"""The parts of out-of-core pruning (:func:`secateurs.stream.prune_checkpoint`): options, block helpers, the walker."""
