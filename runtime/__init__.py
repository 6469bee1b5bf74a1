"""AG-VAS Edge runtime: the torch-free orchestrator over an export directory.

``from agvas.runtime import Inspector`` (imported lazily, so ``import runtime`` stays cheap).
"""

__all__ = ["Inspector", "Result"]


def __getattr__(name: str):
    if name in __all__:
        from . import inspector

        return getattr(inspector, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
