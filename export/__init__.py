"""AG-VAS Edge: export."""
