"""The served models: bundle + verified backend + preprocessing, loaded once before the port is bound."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.manifest import MANIFEST_FILE, BundleError, read_manifest
from models.preprocessing import Preprocessing
from serve.backends import Backend, BackendError, BackendOptions, load_backend
from serve.batching import DynamicBatcher
from serve.errors import ServeError
from serve.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Open Inference Protocol platform names, as Triton reports them.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "tensorrt": "tensorrt_plan",
             "torch": "pytorch"}


@dataclass
class ServedModel:
    """One model as the routes see it."""

    name: str
    bundle: Path
    manifest: dict[str, Any]
    spec: Preprocessing
    backend: Backend
    max_batch: int
    batcher: DynamicBatcher | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def input_name(self) -> str:
        return self.manifest["input"].get("name", "input")

    @property
    def output_name(self) -> str:
        return self.manifest.get("output", {}).get("name", "logits")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        i = self.manifest["input"]
        return int(i.get("channels", 3)), int(i["height"]), int(i["width"])

    @property
    def platform(self) -> str:
        return PLATFORMS.get(self.backend.runtime, self.backend.runtime)

    def info(self) -> dict[str, Any]:
        """The public description (GET /v1/models/{name})."""
        m = self.manifest
        return {
            "name": self.name,
            "variant": m.get("model"),
            "stem": m.get("stem"),
            "runtime": self.backend.runtime,
            "precision": self.backend.precision,
            "device": self.backend.device,
            "max_batch": self.max_batch,
            "input": {**m["input"], "max_batch": self.max_batch},
            "output": m.get("output"),
            "preprocessing": self.spec.to_dict(),
            "labels": self.labels,
            # Provenance without the exporting machine's paths.
            "source": {k: v for k, v in (m.get("source") or {}).items() if k in ("dataset", "sha256")},
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
        args += sorted(str(p.parent) for p in settings.model_dir.glob(f"*/{MANIFEST_FILE}"))
    if not args:
        raise ServeError("no models to serve: pass --model PATH (or name=PATH), or --model-dir DIR")
    return args


def load_model(arg: str, settings: Settings) -> ServedModel:
    """Read, verify and load one bundle; raises ServeError with one line."""
    name, path = parse_model_arg(arg)
    try:
        manifest = read_manifest(path)
        name = name or str(manifest.get("name") or path.name)
        if not NAME_RE.match(name):
            raise ServeError(f"model name {name!r} must match {NAME_RE.pattern} (use --model name=PATH)")
        try:
            spec = Preprocessing.from_dict(manifest["preprocessing"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bad preprocessing in {path / MANIFEST_FILE}: {exc}") from None
        if (spec.crop, spec.crop) != (manifest["input"].get("height"), manifest["input"].get("width")):
            raise BundleError(f"{path / MANIFEST_FILE}: preprocessing crop {spec.crop} does not match the input size")
        options = BackendOptions(settings.threads, settings.parallel, settings.openvino_hint)
        backend = load_backend(path, manifest, settings.backend, settings.device, settings.precision, options)
    except (BundleError, BackendError) as exc:
        raise ServeError(f"model {arg!r}: {exc}") from None
    return ServedModel(name, path, manifest, spec, backend, min(settings.max_batch_size, backend.max_batch))


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
