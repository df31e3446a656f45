"""The one list of runtimes. Export targets, the server's --backend, benchmark targets and Triton platform names
all come from here; adding a runtime is one module with a `RUNTIME` and one line in `BUILTIN`.
"""

from __future__ import annotations

import importlib

from runtimes.base import BackendError, Runtime

# Module of each built-in runtime, in the order help texts list them.
BUILTIN = ("runtimes.onnxruntime", "runtimes.openvino", "runtimes.tensorrt", "runtimes.pytorch")

_RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    """Add a runtime (tests register fakes this way); a second one with the same name or target is an error."""
    for other in _RUNTIMES.values():
        if runtime.name == other.name or runtime.target == other.target:
            raise ValueError(f"runtime {runtime.name!r} (target {runtime.target!r}) is already registered")
    _RUNTIMES[runtime.name] = runtime
    return runtime


def unregister(name: str) -> None:
    """Remove a runtime added by `register` (tests)."""
    _RUNTIMES.pop(name, None)


def runtimes() -> tuple[Runtime, ...]:
    """Every registered runtime."""
    return tuple(_RUNTIMES.values())


def names() -> tuple[str, ...]:
    """Every runtime name (the server's --backend values)."""
    return tuple(_RUNTIMES)


def get(name: str) -> Runtime:
    """The runtime called `name`; BackendError listing the known ones otherwise."""
    try:
        return _RUNTIMES[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(_RUNTIMES)}") from None


def by_target(target: str) -> Runtime | None:
    """The runtime whose export target family is `target` ("onnx", "openvino", ...), if any."""
    return next((r for r in _RUNTIMES.values() if r.target == target), None)


for _module in BUILTIN:
    register(importlib.import_module(_module).RUNTIME)
