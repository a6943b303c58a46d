"""Makes the backend fixtures of `backends.py` available to the contract suites."""

from .backends import backend, backend_clock, registry_backend

__all__ = ["backend", "backend_clock", "registry_backend"]
