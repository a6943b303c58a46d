"""Makes the backend fixtures of `backends.py` available to the contract suites."""

from .backends import backend, backend_clock

__all__ = ["backend", "backend_clock"]
