"""ffablate: ablate Forward-Forward layer-local training against architecture-matched backpropagation."""

from typing import Any

from ffablate.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "load_run", "__version__"]


def __getattr__(name: str) -> Any:
    # ``ffablate.load_run`` imports torch on first use, not with the package: the CLI starts without it.
    if name == "load_run":
        from ffablate.saved import load_run

        return load_run
    raise AttributeError(f"module 'ffablate' has no attribute {name!r}")
