"""Encoder attention backends behind one interface (see :mod:`saicl.attention.base`)."""

from .base import AttentionBackend, BackendUnavailableError
from .registry import (
    available_backends,
    backend_names,
    get_backend,
    register_backend,
    resolve_backend_name,
)

__all__ = [
    "AttentionBackend",
    "BackendUnavailableError",
    "available_backends",
    "backend_names",
    "get_backend",
    "register_backend",
    "resolve_backend_name",
]
