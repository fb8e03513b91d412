"""Backend registry: names map to lazily imported classes, so importing saicl never imports
Triton, xFormers or queries CUDA."""

from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, BackendUnavailableError

# name -> "module:Class"; modules are imported only when the backend is asked for.
_BACKENDS: dict[str, str] = {
    "eager": "saicl.attention.eager:EagerBackend",
    "torch": "saicl.attention.segmented:SegmentedBackend",
    "flex": "saicl.attention.flex:FlexBackend",
    "triton": "saicl.attention.triton:TritonBackend",
    "xformers": "saicl.attention.xformers_backend:XFormersBackend",
}
AUTO = "auto"
_instances: dict[str, AttentionBackend] = {}
# Preference order for "auto" on each device type: first available wins. On CUDA, flex leads until a
# GPU benchmark shows the triton kernel faster (issue 3's rule); the kernel has only run in the Triton
# interpreter so far (docs/benchmarks.md).
_AUTO_ORDER = {"cuda": ("flex", "triton", "torch"), "cpu": ("torch",)}


def backend_names() -> list[str]:
    """All registered backend names plus ``"auto"``."""
    return [*_BACKENDS, AUTO]


def register_backend(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (later issues and plugins add backends this way)."""
    _BACKENDS[name] = target
    _instances.pop(name, None)


def check_backend_name(name: str) -> str:
    if name not in _BACKENDS and name != AUTO:
        raise ValueError(f"attn_backend={name!r} is not a known backend; expected one of {backend_names()}")
    return name


def _load(name: str) -> AttentionBackend:
    if name not in _instances:
        module_name, class_name = _BACKENDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise BackendUnavailableError(
                f"attn_backend={name!r} is unavailable: importing {module_name} failed ({err})"
            ) from err
        _instances[name] = getattr(module, class_name)()
    return _instances[name]


def unavailable_reason(name: str, device: torch.device | str, head_dim: int | None = None) -> str | None:
    """``None`` if backend ``name`` runs on ``device`` (with heads of ``head_dim``, if given), else why not."""
    check_backend_name(name)
    if name == AUTO:
        return None
    try:
        backend = _load(name)
    except BackendUnavailableError as err:
        return str(err)
    device = torch.device(device)
    reason = backend.unavailable_reason(device)
    if reason is None and head_dim is not None:
        reason = backend.head_dim_reason(device, head_dim)
    return reason


def available_backends(device: torch.device | str = "cpu", head_dim: int | None = None) -> dict[str, str | None]:
    """Map every backend name to ``None`` (available on ``device``) or the reason it is not."""
    return {name: unavailable_reason(name, device, head_dim) for name in _BACKENDS}


def resolve_backend_name(name: str, device: torch.device | str, head_dim: int | None = None) -> str:
    """Turn ``"auto"`` into the best available backend for ``device`` (and ``head_dim``); check the others."""
    check_backend_name(name)
    device = torch.device(device)
    if name == AUTO:
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device, head_dim) is None:
                return candidate
        return "eager"
    reason = unavailable_reason(name, device, head_dim)
    if reason is not None:
        raise BackendUnavailableError(f"attn_backend={name!r} cannot run on {device}: {reason}")
    return name


def get_backend(name: str, device: torch.device | str = "cpu", head_dim: int | None = None) -> AttentionBackend:
    """The backend instance for ``name`` (``"auto"`` resolved) on ``device``; raises if unavailable.

    ``head_dim``: the model's head dimension, when known; backends that cannot run it are skipped by ``auto``.
    """
    return _load(resolve_backend_name(name, device, head_dim))
