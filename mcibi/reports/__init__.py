"""What a person reads: the results table against the published numbers, and the per-run figures."""
