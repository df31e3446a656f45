"""The served models: bundle + verified backend + preprocessing, loaded once before the port is bound."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runtimes
from models.bundle import MANIFEST_FILE, BundleError, Manifest, read_manifest
from models.preprocessing import Preprocessing
from runtimes import Backend, BackendError, BackendOptions
from serve.batching import DynamicBatcher
from serve.errors import ServeError
from serve.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ServedModel:
    """One model as the routes see it."""

    name: str
    bundle: Path
    manifest: Manifest
    backend: Backend
    max_batch: int
    batcher: DynamicBatcher | None = field(default=None, repr=False)

    @property
    def spec(self) -> Preprocessing:
        return self.manifest.preprocessing

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def input_name(self) -> str:
        return self.manifest.input.name

    @property
    def output_name(self) -> str:
        return self.manifest.output.name

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.manifest.input.sample_shape

    @property
    def platform(self) -> str:
        """The Open Inference Protocol platform name, as Triton reports it."""
        return runtimes.get(self.backend.runtime).triton_platform

    def info(self) -> dict[str, Any]:
        """The public description (GET /v1/models/{name})."""
        m = self.manifest
        return {
            "name": self.name,
            "variant": m.model,
            "stem": m.stem,
            "runtime": self.backend.runtime,
            "precision": self.backend.precision,
            "device": self.backend.device,
            "max_batch": self.max_batch,
            "input": {**m.input.to_dict(), "max_batch": self.max_batch},
            "output": m.output.to_dict(),
            "preprocessing": self.spec.to_dict(),
            "labels": self.labels,
            # Provenance without the exporting machine's paths.
            "source": {"dataset": m.source.dataset, "sha256": m.source.sha256},
            "ready": bool(self.batcher and self.batcher.ready),
        }


def parse_model_arg(arg: str) -> tuple[str | None, Path]:
    """`path` or `name=path` -> (name or None, path)."""
    name, sep, path = arg.partition("=")
    if sep and NAME_RE.match(name):
        return name, Path(path)
    return None, Path(arg)


def model_args(settings: Settings) -> list[str]:
    """--model values plus every bundle directly under --model-dir."""
    args = list(settings.models)
    if settings.model_dir is not None:
        if not settings.model_dir.is_dir():
            raise ServeError(f"--model-dir {settings.model_dir} is not a directory")
        # Hidden directories are an export's temporaries (a killed export leaves one): never models.
        args += sorted(str(p.parent) for p in settings.model_dir.glob(f"*/{MANIFEST_FILE}")
                       if not p.parent.name.startswith("."))
    if not args:
        raise ServeError("no models to serve: pass --model PATH (or name=PATH), or --model-dir DIR")
    return args


def load_model(arg: str, settings: Settings) -> ServedModel:
    """Read, verify and load one bundle; raises ServeError with one line."""
    name, path = parse_model_arg(arg)
    try:
        manifest = read_manifest(path)
        name = name or manifest.name
        if not NAME_RE.match(name):
            raise ServeError(f"model name {name!r} must match {NAME_RE.pattern} (use --model name=PATH)")
        options = BackendOptions(device=settings.device, threads=settings.threads, parallel=settings.parallel,
                                 hint=settings.openvino_hint)
        backend = runtimes.open_backend(path, manifest, settings.backend, settings.precision, options)
    except (BundleError, BackendError) as exc:
        raise ServeError(f"model {arg!r}: {exc}") from None
    return ServedModel(name, path, manifest, backend, min(settings.max_batch_size, backend.max_batch))


def load_models(settings: Settings) -> dict[str, ServedModel]:
    """Every configured model, by name; nothing is left loaded if one fails (and nothing is logged before)."""
    models: dict[str, ServedModel] = {}
    try:
        for arg in model_args(settings):
            model = load_model(arg, settings)
            if model.name in models:
                model.backend.close()
                raise ServeError(
                    f"two models are named {model.name!r} ({models[model.name].bundle} and {model.bundle}); "
                    "rename one with --model name=PATH"
                )
            models[model.name] = model
    except BaseException:
        close_models(models)
        raise
    return models


def close_models(models: dict[str, ServedModel]) -> None:
    """Release every backend."""
    for m in models.values():
        m.backend.close()
