"""Backend registry and selection. Each backend module is imported lazily and may fail to import;
a failure is recorded once, with its reason, and the next backend is chosen instead."""
from __future__ import annotations

import importlib

from .base import Backend, Engine, EngineOptions

# Fastest first: "auto" takes the first that supports the arrays' device.
_REGISTRY = (
    ("native-cuda", "fastddpm.executors.native_cuda", "CUDA_BACKEND"),
    ("native-cpu", "fastddpm.executors.native", "CPU_BACKEND"),
    ("numba", "fastddpm.executors.numba_backend", "BACKEND"),
    ("torch", "fastddpm.executors.torch_ref", "BACKEND"),
)
NAMES = tuple(name for name, _, _ in _REGISTRY)

_loaded: dict[str, Backend | str] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this request; the message lists every reason."""


def get(name: str) -> Backend | str:
    """The backend object, or a string saying why its module could not be imported."""
    if name not in _loaded:
        for reg_name, module, attr in _REGISTRY:
            if reg_name == name:
                try:
                    _loaded[name] = getattr(importlib.import_module(module), attr)
                except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
                    _loaded[name] = f"{module} failed to import: {type(exc).__name__}: {exc}"
                break
        else:
            raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    return _loaded[name]


def reasons(name: str, device: str | None = None) -> list[str]:
    be = get(name)
    if isinstance(be, str):
        return [be]
    return be.supports(device) if device is not None else be.unavailable()


def backends() -> dict[str, dict]:
    """Each backend: {"available": bool, "reasons": [...], "devices": [...], **details}."""
    out = {}
    for name in NAMES:
        be = get(name)
        why = reasons(name)
        entry = {"available": not why, "reasons": why}
        if not isinstance(be, str):
            entry["devices"] = list(be.devices)
            if not why:
                try:
                    entry.update(be.describe())
                except Exception as exc:  # noqa: BLE001 - info must never crash
                    entry["describe_error"] = str(exc)
        out[name] = entry
    return out


# Availability is fixed for the life of the process, so a selection is worked out once (hot path).
_auto_cache: dict[str, Backend] = {}
_named_cache: dict[tuple, Backend] = {}


def select(backend: str, device: str) -> Backend:
    """The backend to run a request on arrays living on ``device``, or BackendUnavailableError."""
    if backend == "auto":
        chosen = _auto_cache.get(device)
        if chosen is not None:
            return chosen
        refusals = []
        for name in NAMES:
            why = reasons(name, device)
            if not why:
                _auto_cache[device] = get(name)
                return _auto_cache[device]
            refusals.append(f"{name}: " + "; ".join(why))
        raise BackendUnavailableError(f"no backend can run on {device} arrays:\n  " + "\n  ".join(refusals))
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    chosen = _named_cache.get((backend, device))
    if chosen is not None:
        return chosen
    why = reasons(backend, device)  # raises ValueError for an unknown name
    if why:
        raise BackendUnavailableError(f"backend {backend!r} cannot run this request:\n  - " + "\n  - ".join(why))
    _named_cache[(backend, device)] = get(backend)
    return _named_cache[(backend, device)]


def sampling_backend(backend: str, history: int = 0) -> Backend:
    """The backend a whole sampling loop runs on: the named one on its first device, or for
    "auto" the first backend (fastest first) that can run on its own first device and whose step
    reads ``history`` previous predictions (a multistep solver's)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto":
        be = get(backend)   # ValueError for an unknown name
        be = select(backend, be.devices[0] if not isinstance(be, str) else "cpu")
        if history > be.max_history:
            raise BackendUnavailableError(f"backend {backend!r} cannot run this sampler: its step reads at most "
                                          f"{be.max_history} previous predictions, the sampler needs {history}")
        return be
    for name in NAMES:
        be = get(name)
        if not isinstance(be, str) and not be.supports(be.devices[0]) and history <= be.max_history:
            return be
    return select("auto", "cpu")   # raises, naming every backend's reasons


def engine_for(be: Backend, config, weights, batch: int, height: int, width: int,
               options: EngineOptions | None = None) -> Engine:
    """The backend's own engine, or where it has none the reference U-Net with its fused step."""
    engine = be.make_engine(config, weights, batch, height, width, options)
    if engine is None:
        from .torch_ref import ReferenceEngine
        engine = ReferenceEngine(config, weights, batch, height, width, options, step_backend=be)
    return engine
