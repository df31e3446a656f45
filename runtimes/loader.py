"""Open an artifact as a Backend: pick it from the manifest, verify its files, load it, prove it answers.

The server, the benchmarks and the export's parity gate all come through `open_artifact`, so the numbers the
manifest records are measured on the code that serves.
"""

from __future__ import annotations

import os

import numpy as np

from models.bundle import Artifact, BundleError, Manifest, verify_files
from runtimes import registry
from runtimes.base import Backend, BackendError, BackendOptions, LoadSpec, Runtime, first_line


def select(manifest: Manifest, runtime: Runtime, precision: str | None = None) -> Artifact:
    """The servable artifact the runtime would open (its own, or its fallback's); raises BundleError."""
    try:
        return manifest.select(runtime.name, precision)
    except BundleError:
        if runtime.fallback is None or precision not in (None, runtime.fallback[1]):
            raise
        return manifest.select(*runtime.fallback)


def open_backend(bundle: str | os.PathLike, manifest: Manifest, runtime: str, precision: str | None = None,
                 options: BackendOptions | None = None) -> Backend:
    """Select the servable artifact, verify its sha256, load it and check one warm-up inference."""
    options = options or BackendOptions()
    rt = registry.get(runtime)
    rt.require(options.device)
    artifact = select(manifest, rt, precision)
    files = verify_files(bundle, artifact)
    return open_artifact(rt, LoadSpec(manifest, artifact, tuple(files), options), where=str(bundle))


def open_artifact(runtime: Runtime, spec: LoadSpec, where: str = "") -> Backend:
    """`runtime.load(spec)` with its errors as one BackendError line, then a warm-up that checks the output."""
    try:
        backend = runtime.load(spec)
    except (BackendError, BundleError):
        raise
    except Exception as exc:  # runtimes raise their own types; the caller needs one readable line
        raise BackendError(f"{runtime.name} cannot load {spec.artifact.id!r}"
                           f"{' from ' + where if where else ''}: {first_line(exc)}") from exc
    try:
        warm_up(backend, spec)
    except BaseException:
        backend.close()
        raise
    return backend


def warm_up(backend: Backend, spec: LoadSpec) -> None:
    """One batch-1 inference (first-call allocations happen now) whose output must be (1, classes)."""
    y = backend.infer(np.zeros((1, *spec.sample_shape), np.float32))
    if getattr(y, "shape", None) != (1, spec.num_classes):
        raise BackendError(f"{spec.artifact.id!r} returns shape {tuple(getattr(y, 'shape', ()))} for one image, "
                           f"but the manifest lists {spec.num_classes} classes")
