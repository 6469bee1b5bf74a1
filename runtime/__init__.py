"""AG-VAS Edge: runtime."""
