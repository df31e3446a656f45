"""The one list of runtimes. Export targets, the server's --backend, benchmark targets and Triton platform names
all come from here; adding a runtime is one module with a `RUNTIME` and one line in `BUILTIN`.

A runtime kept outside this repository is plugged in without editing it: `VITC_RUNTIMES=my_pkg.my_runtime` (comma-
separated modules, each defining `RUNTIME`) registers it in every process that reads the environment.
"""

from __future__ import annotations

import importlib
import os

from runtimes.base import BackendError, Runtime, first_line

# Module of each built-in runtime, in the order help texts list them.
BUILTIN = ("runtimes.onnxruntime", "runtimes.openvino", "runtimes.tensorrt", "runtimes.pytorch")

# The runtime a command uses when none is named (the server's --backend, the benchmarks', export.report --served),
# and the export targets built when none are named (`python -m export`, export.bundle, the benchmarks' bundles):
# defined here once, so the stages cannot drift apart.
DEFAULT_RUNTIME = "onnxruntime"
DEFAULT_TARGETS: tuple[str, ...] = ("onnx", "openvino")

PLUGINS_ENV = "VITC_RUNTIMES"

_RUNTIMES: dict[str, Runtime] = {}
_PLUGIN_ERRORS: dict[str, str] = {}  # plugin module -> why it could not be registered


def register(runtime: Runtime) -> Runtime:
    """Add a runtime (tests register fakes this way); a second one with the same name or target is an error."""
    if not isinstance(runtime, Runtime):  # a plugin module's RUNTIME that is something else: say so, by name
        raise TypeError(f"register takes a runtimes.Runtime, got {type(runtime).__name__} {runtime!r:.80}")
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
        failed = "".join(f"; {PLUGINS_ENV} plugin {m!r} failed: {why}" for m, why in _PLUGIN_ERRORS.items())
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(_RUNTIMES)}{failed}") from None


def by_target(target: str) -> Runtime | None:
    """The runtime whose export target family is `target` ("onnx", "openvino", ...), if any."""
    return next((r for r in _RUNTIMES.values() if r.target == target), None)


def _load(module: str) -> None:
    register(importlib.import_module(module).RUNTIME)


for _module in BUILTIN:
    _load(_module)
for _module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
    try:
        _load(_module)
    except Exception as exc:  # a broken plugin must not take the built-in runtimes down with it
        _PLUGIN_ERRORS[_module] = f"{type(exc).__name__}: {first_line(exc)}"
