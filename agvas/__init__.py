"""AG-VAS Edge: the `agvas` command and the small torch-free helpers shared by every part."""

__version__ = "0.1.0"
