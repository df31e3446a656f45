"""Inference runtimes, one module each (onnxruntime, OpenVINO, TensorRT, torch), shared by export, serve and
benchmarks: how each builds its artifact, opens it as a Backend, and what it is called elsewhere."""

from runtimes import registry, telemetry
from runtimes.base import Backend, BackendError, BackendOptions, LoadSpec, Runtime, Variant
from runtimes.build import ExportError
from runtimes.loader import open_artifact, open_backend, select
from runtimes.registry import by_target, get, names, register, runtimes, unregister

telemetry.off()  # every runtime module imports its library lazily, after this

__all__ = [
    "Backend",
    "BackendError",
    "BackendOptions",
    "ExportError",
    "LoadSpec",
    "Runtime",
    "Variant",
    "by_target",
    "get",
    "names",
    "open_artifact",
    "open_backend",
    "register",
    "runtimes",
    "select",
    "unregister",
]

# Last, with every name above bound: a VITC_RUNTIMES plugin imports this package's API while it loads.
registry.load_runtimes()
