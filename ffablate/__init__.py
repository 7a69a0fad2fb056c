"""ffablate: ablate Forward-Forward layer-local training against architecture-matched backpropagation."""

from ffablate.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
