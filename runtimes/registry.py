"""The one list of runtimes. Export targets, the server's --backend, benchmark targets and Triton platform names
all come from here; adding a runtime is one module with a `RUNTIME` and one line in `BUILTIN`.

A runtime kept outside this repository is plugged in without editing it: `VITC_RUNTIMES=my_pkg.my_runtime` (comma-
separated modules, each defining `RUNTIME`) registers it in every process that reads the environment, once the
`runtimes` package is initialised (`load_runtimes`), so a plugin may import the package's API itself.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from typing import Any

from models.tolerance import TOLERANCES
from runtimes.base import TUNABLES, BackendError, Runtime, TritonRelease, Variant, first_line

# Module of each built-in runtime, in the order help texts list them.
BUILTIN = ("runtimes.onnxruntime", "runtimes.openvino", "runtimes.tensorrt", "runtimes.pytorch")

# The runtime a command uses when none is named (the server's --backend, the benchmarks', export.report --served),
# and the export targets built when none are named (`python -m export`, export.bundle, the benchmarks' bundles):
# defined here once, so the stages cannot drift apart.
DEFAULT_RUNTIME = "onnxruntime"
DEFAULT_TARGETS: tuple[str, ...] = ("onnx", "openvino")

PLUGINS_ENV = "VITC_RUNTIMES"

# What a runtime's name and target may be: export.targets lowercases `--targets` and splits them at the first "-",
# and commas separate them (and the benchmarks' ids), so anything else could be registered but never named.
NAME_RE = re.compile(r"[a-z0-9_]+")
NAME_RULE = "lowercase ASCII letters, digits or '_'"
DEVICE_KINDS = ("cpu", "cuda")  # what Runtime.devices may hold (models.device: cpu, cuda, cuda:N)
_STRINGS = ("packages", "precisions", "default_precisions", "devices", "tunes")  # tuple[str, ...] fields


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _file_pairs(value: Any) -> bool:
    """A tuple of (artifact file suffix, name in Triton's version directory) pairs of strings."""
    return isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                            for p in value)


# The type of every other field but the variants: (fields, test, what they must be). Each one is used later without a
# check (called, unpacked, written into a config.pbtxt), where a wrong one failed as a bare TypeError or IndexError.
_TYPES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("install", "format", "triton_platform"), _text, "a non-empty string"),
    (("build", "load", "version", "unavailable", "mismatch", "triton_min_check"), callable, "callable"),
    (("profile",), lambda v: v is None or callable(v), "callable or None"),
    (("export_extra", "triton_backend", "triton_threads", "triton_streams"), _text_or_none, "a string or None"),
    (("needs_hub", "triton_threads_shared", "triton_platform_fills", "triton_cpu_only", "triton_fixed_batch"),
     lambda v: isinstance(v, bool), "True or False"),
    (("triton_note",), lambda v: isinstance(v, str), "a string"),
    (("triton_files",), _file_pairs, "a tuple of (file suffix, name) pairs of strings"),
    (("triton_release",), lambda v: v is None or isinstance(v, TritonRelease),
     "a runtimes.base.TritonRelease or None"),
)

_RUNTIMES: dict[str, Runtime] = {}
_PLUGIN_ERRORS: dict[str, str] = {}  # runtime module -> "<what it is> <module> failed: <why>", as refusals end
_CLASHES: dict[tuple[str, str], str] = {}  # ("name" | "target", value) a failed module's runtime claimed -> module
_LOADED = False  # whether `load_runtimes` has run


def _tuple_of_strings(runtime: Runtime, field: str) -> tuple[str, ...]:
    value = getattr(runtime, field)
    if not isinstance(value, tuple) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"runtime {runtime.name!r:.60}: {field} must be a tuple of strings, got "
                         f"{type(value).__name__} {value!r:.60}")
    return value


def _subset(runtime: Runtime, field: str, allowed: tuple[str, ...], of: str, empty: bool = False) -> None:
    values = _tuple_of_strings(runtime, field)
    if not values and not empty:
        raise ValueError(f"runtime {runtime.name!r}: {field} is empty")
    if bad := [x for x in values if x not in allowed]:
        raise ValueError(f"runtime {runtime.name!r}: {field} has {bad[0]!r:.40}, not one of {of} "
                         f"({', '.join(allowed)})")


def check_runtime(runtime: Any) -> None:
    """TypeError or ValueError (one line naming the field) unless `runtime` is a Runtime every stage can use."""
    if not isinstance(runtime, Runtime):  # a plugin module's RUNTIME that is something else: say so, by name
        raise TypeError(f"register takes a runtimes.Runtime, got {type(runtime).__name__} {runtime!r:.80}")
    for field in ("name", "target"):
        value = getattr(runtime, field)
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise ValueError(f"runtime {runtime.name!r:.60}: {field} must be {NAME_RULE} (what --targets "
                             f"and --backend can name), got {value!r:.60}")
    for field in _STRINGS:
        _tuple_of_strings(runtime, field)
    _subset(runtime, "precisions", tuple(TOLERANCES), "the precisions export gates")
    _subset(runtime, "default_precisions", runtime.precisions, "its precisions")
    _subset(runtime, "devices", DEVICE_KINDS, "the device kinds")
    _subset(runtime, "tunes", TUNABLES, "the server's tuning settings", empty=True)
    for fields, test, what in _TYPES:
        for field in fields:
            if not test(value := getattr(runtime, field)):
                raise ValueError(f"runtime {runtime.name!r}: {field} must be {what}, got {value!r:.60}")
    _check_export_device(runtime)
    _check_fallback(runtime)
    _check_variants(runtime)


def _check_export_device(runtime: Runtime) -> None:
    """The export's parity gate runs the artifacts there (`require`, BackendOptions): a device kind it runs on."""
    value = runtime.export_device
    if not (isinstance(value, str) and value in runtime.devices):
        raise ValueError(f"runtime {runtime.name!r}: export_device must be one of its devices "
                         f"({', '.join(runtime.devices)}), got {value!r:.60}")


def _check_fallback(runtime: Runtime) -> None:
    """None, or the (runtime name, precision) pair the loader selects from the manifest (`select`)."""
    value = runtime.fallback
    if value is None:
        return
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, str) for x in value)
            and NAME_RE.fullmatch(value[0]) and value[1] in TOLERANCES):
        raise ValueError(f"runtime {runtime.name!r}: fallback must be None or a (runtime name, precision) pair, got "
                         f"{value!r:.60} (precisions: {', '.join(TOLERANCES)})")


def _check_variants(runtime: Runtime) -> None:
    """A tuple of Variants, each on one of its devices and of one of its precisions."""
    variants = runtime.variants
    if not isinstance(variants, tuple) or not all(isinstance(v, Variant) for v in variants):
        raise ValueError(f"runtime {runtime.name!r}: variants must be a tuple of runtimes.Variant, got "
                         f"{variants!r:.60}")
    for v in variants:
        if v.device not in runtime.devices or v.artifact_precision not in runtime.precisions:
            raise ValueError(f"runtime {runtime.name!r}: variants has {v.precision} on {v.device} of a "
                             f"{v.artifact_precision} artifact, not one of its devices and precisions")


def _same(runtime: Runtime, other: Runtime) -> bool:
    """Whether two Runtimes are one: the same object, or an equal one (every field, its functions included)."""
    if runtime is other:
        return True
    try:  # a field a plugin filled with something whose == misbehaves (an array) makes them different, not an error
        return type(runtime) is type(other) and bool(runtime == other)
    except Exception:
        return False


def _clashes(runtime: Runtime) -> list[tuple[str, str, Runtime]]:
    """Each field ("name", "target") of `runtime` that another registered runtime already has: field, value, that
    one (the runtime itself, registered already, is no clash)."""
    return [(field, getattr(runtime, field), other) for other in _RUNTIMES.values() for field in ("name", "target")
            if getattr(runtime, field) == getattr(other, field) and not _same(runtime, other)]


def register(runtime: Runtime) -> Runtime:
    """Add a runtime (tests register fakes this way); returns it."""
    # One whose declaration is unusable is an error (one line naming the field), as is one whose name or target
    # another registered one has (below).
    check_runtime(runtime)
    # Registering the same runtime again does nothing: a plugin that registers itself on import, or a package that
    # re-exports its module's runtime with both named in VITC_RUNTIMES, comes here twice with it.
    if any(_same(runtime, other) for other in _RUNTIMES.values()):
        return runtime  # the one registered stays
    if clashes := _clashes(runtime):
        field, value, other = clashes[0]
        raise ValueError(f"runtime {runtime.name!r}: its {field} {value!r} is already registered, by runtime "
                         f"{other.name!r}; give it another {field}")
    _RUNTIMES[runtime.name] = runtime
    return runtime


def unregister(name: str) -> None:
    """Remove a runtime added by `register`: plugin and test API (vitc itself never calls it)."""
    _RUNTIMES.pop(name, None)


def runtimes() -> tuple[Runtime, ...]:
    """Every registered runtime."""
    return tuple(_RUNTIMES.values())


def names() -> tuple[str, ...]:
    """Every runtime name (the server's --backend values)."""
    return tuple(_RUNTIMES)


def load_failures() -> str:
    """Why each runtime module that could not be registered failed ("; <module> failed: <why>" each, "" when none):
    the end of every refusal of an unknown backend or target, so a broken runtime is never silently missing."""
    return "".join(f"; {why}" for why in _PLUGIN_ERRORS.values())


def shadowed(field: str, value: str) -> str | None:
    """The refusal of a registered runtime's `field` ("name" or "target") `value` that a module which failed to
    register claimed too (the user means theirs, which would silently not run); None when none did."""
    module = _CLASHES.get((field, value))
    if module is None:
        return None
    return f"{value!r} is also the {field} of a runtime that could not be registered: {_PLUGIN_ERRORS[module]}"


def pick(name: str) -> Runtime:
    """The runtime called `name` for a model to run on (a server's --backend, a repository model's artifact):
    BackendError when unknown, or when a module that failed to register claimed that name too (the user means
    theirs, which would silently not run)."""
    runtime = get(name)
    if why := shadowed("name", name):
        raise BackendError(why)
    return runtime


def get(name: str) -> Runtime:
    """The runtime called `name`; BackendError listing the known ones otherwise."""
    try:
        return _RUNTIMES[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(_RUNTIMES)}{load_failures()}") from None


def by_target(target: str) -> Runtime | None:
    """The runtime whose export target family is `target` ("onnx", "openvino", ...), if any."""
    return next((r for r in _RUNTIMES.values() if r.target == target), None)


def _load(module: str, what: str) -> None:
    """Register `module`'s RUNTIME; a failure is recorded for the refusals that would otherwise just say "unknown"
    (a broken module must not take the other runtimes, or every command, down with it)."""
    runtime = None
    try:
        runtime = importlib.import_module(module).RUNTIME
        register(runtime)
    except Exception as exc:
        _PLUGIN_ERRORS[module] = f"{what} {module!r} failed: {type(exc).__name__}: {first_line(exc)}"
        for field, value, _ in _clashes(runtime) if isinstance(runtime, Runtime) else ():
            _CLASHES[field, value] = module


def load_runtimes() -> None:
    """Register the built-in runtimes, then the VITC_RUNTIMES plugins: once, from runtimes/__init__.py's last line."""
    # Called once the package is fully initialised, so a plugin may use its public API at import time (`from
    # runtimes import register`, `runtimes.open_backend`): from this module's body, the package was still half-built.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # first: a plugin importing `runtimes` (already in sys.modules) must not load them again
    for module in BUILTIN:
        _load(module, "built-in runtime module")
    # Each module once, and a built-in named again is already there (neither clashes with itself).
    for module in dict.fromkeys(m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")):
        if module and module not in BUILTIN:
            _load(module, f"{PLUGINS_ENV} plugin")
