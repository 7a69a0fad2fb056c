"""ffablate: ablate Forward-Forward layer-local training against architecture-matched backpropagation."""

from typing import Any

from ffablate.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "load_run", "resume_run", "__version__"]


def __getattr__(name: str) -> Any:
    # ``ffablate.load_run`` imports torch on first use, not with the package: the CLI starts without it.
    if name in ("load_run", "resume_run"):
        from ffablate import saved

        return getattr(saved, name)
    raise AttributeError(f"module 'ffablate' has no attribute {name!r}")
