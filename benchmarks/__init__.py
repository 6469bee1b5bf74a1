"""AG-VAS Edge: benchmarks."""
