"""Training: the loop, one step, losses, optimiser, sample order and RNG state, resumable checkpoints."""
