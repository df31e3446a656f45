"""The served models: bundle + verified backend + preprocessing, loaded once before the port is bound."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runtimes
from models.bundle import MANIFEST_FILE, BundleError, Manifest, read_manifest
from models.preprocessing import Preprocessing
from runtimes import Backend, BackendError, BackendOptions
from serve import tritonconfig
from serve.batching import DynamicBatcher
from serve.errors import ServeError
from serve.settings import Settings
from serve.stats import ModelStats

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
BUNDLE_VERSION = "1"  # a bundle served directly has one version


@dataclass
class ServedModel:
    """One model as the routes see it."""

    name: str
    bundle: Path
    manifest: Manifest
    backend: Backend
    max_batch: int
    version: str = "1"
    source: ModelSource | None = None
    queue_delay_ms: float | None = None  # from the repository's config.pbtxt; None: the server's setting
    batcher: DynamicBatcher | None = field(default=None, repr=False)
    stats: ModelStats = field(default_factory=ModelStats, repr=False)
    users: int = field(default=0, repr=False)  # requests holding this version (a swap waits for them)
    startup: dict[str, float] = field(default_factory=dict, repr=False)  # seconds of each loading step
    execution: dict[str, Any] = field(default_factory=dict, repr=False)  # backend.describe() at load

    def __post_init__(self) -> None:
        if not self.execution and self.backend is not None:  # once: a drained, closed backend cannot describe itself
            self.execution = self.backend.describe()

    @property
    def spec(self) -> Preprocessing:
        return self.manifest.preprocessing

    def jpeg_draft(self, policy: str) -> bool:
        """Whether this model decodes big JPEGs in draft mode (much faster) under the server's policy: "measured"
        only when its served-path record (`python -m export.report --served`) shows it costs no more than the
        accuracy budget (on a 32-pixel model it can cost points, so it is never assumed)."""
        if policy != "measured":
            return policy == "always"
        return self.manifest.served is not None and self.manifest.served.jpeg_draft

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
            "execution": self.execution,  # what really runs: threads, compute precision, providers, ...
            "max_batch": self.max_batch,
            "input": {**m.input.to_dict(), "max_batch": self.max_batch},
            "output": m.output.to_dict(),
            "preprocessing": self.spec.to_dict(),
            "labels": self.labels,
            # Provenance without the exporting machine's paths.
            "source": {"dataset": m.source.dataset, "sha256": m.source.sha256},
            "version": self.version,
            "provenance": m.provenance.to_dict() if m.provenance else None,
            "ready": bool(self.batcher and self.batcher.ready),
        }

    def provenance_labels(self) -> dict[str, str]:
        """A few provenance facts as short strings (metric labels, v2 metadata parameters)."""
        p = self.manifest.provenance
        return {"version": self.version, "weights_sha256": self.manifest.source.sha256[:12],
                "vitc_version": p.vitc_version if p else "unknown",
                "git_commit": (p.git_commit or "unknown")[:12] if p else "unknown",
                "exported": self.manifest.created}


def parse_model_arg(arg: str) -> tuple[str | None, Path]:
    """`path` or `name=path` -> (name or None, path)."""
    name, sep, path = arg.partition("=")
    if sep and NAME_RE.fullmatch(name):
        return name, Path(path)
    return None, Path(arg)


@dataclass(frozen=True)
class ModelSource:
    """Where a served model comes from: a bundle directory, or a model directory of a Triton-style repository
    (numbered version directories, each a bundle, as `python -m export.triton` writes them; the highest is served).
    Loading again re-reads it: a bundle exported anew in place, or a new version directory, is what loads."""

    path: Path
    name: str | None = None  # None: the bundle's own name
    repository: bool = False

    def versions(self) -> list[str]:
        """Available versions, oldest first."""
        if not self.repository:
            return [BUNDLE_VERSION]
        found = [p.name for p in self.path.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0"
                 and (p / MANIFEST_FILE).is_file()] if self.path.is_dir() else []
        return sorted(found, key=int)

    def newest(self) -> tuple[str, Path]:
        """(version, bundle directory) that loads; BundleError when there is none."""
        if not self.repository:
            return BUNDLE_VERSION, self.path
        versions = self.versions()
        if not versions:
            raise BundleError(f"model directory {self.path} has no version directory (1/, 2/, ...) with a "
                              f"{MANIFEST_FILE}")
        return versions[-1], self.path / versions[-1]

    def describe(self) -> str:
        return f"{self.name}={self.path}" if self.name else str(self.path)


def model_sources(settings: Settings) -> list[ModelSource]:
    """--model values, every bundle directly under --model-dir, every model of --model-repository."""
    sources = [ModelSource(path, name) for name, path in map(parse_model_arg, settings.models)]
    for flag, root in (("--model-dir", settings.model_dir), ("--model-repository", settings.model_repository)):
        if root is not None and not root.is_dir():
            raise ServeError(f"{flag} {root} is not a directory")
    if settings.model_dir is not None:
        # Hidden directories are an export's temporaries (a killed export leaves one): never models.
        sources += [ModelSource(p.parent) for p in sorted(settings.model_dir.glob(f"*/{MANIFEST_FILE}"))
                    if not p.parent.name.startswith(".")]
    if settings.model_repository is not None:
        sources += [ModelSource(p, p.name, repository=True) for p in sorted(settings.model_repository.iterdir())
                    if p.is_dir() and not p.name.startswith(".") and NAME_RE.fullmatch(p.name)]
    if not sources:
        raise ServeError("no models to serve: pass --model PATH (or name=PATH), --model-dir DIR or "
                         "--model-repository DIR")
    return sources


def model_args(settings: Settings) -> list[str]:
    """The configured sources as CLI arguments (paths, `name=path` where a name is given)."""
    return [s.describe() for s in model_sources(settings) if not s.repository]


def load_model(source: ModelSource | str, settings: Settings) -> ServedModel:
    """Read, verify and load one model (its newest version); raises ServeError with one line."""
    if isinstance(source, str):
        name, path = parse_model_arg(source)
        source = ModelSource(path, name)
    start = time.perf_counter()
    try:
        version, path = source.newest()
        manifest = read_manifest(path)
        name = source.name or manifest.name
        if not NAME_RE.fullmatch(name):
            raise ServeError(f"model name {name!r} must match {NAME_RE.pattern} (use --model name=PATH)")
        options = BackendOptions(device=settings.device, threads=settings.threads, parallel=settings.parallel,
                                 hint=settings.openvino_hint, compile=settings.compile,
                                 channels_last=settings.channels_last)
        # A repository version holds one artifact (python -m export.triton): it runs on that artifact's runtime.
        runtime = manifest.servable()[0].runtime if source.repository and manifest.servable() else settings.backend
        precision = None if source.repository else settings.precision
        config = tritonconfig.read(source.path) if source.repository else None
        startup = {"read_manifest": time.perf_counter() - start}
        backend = runtimes.open_backend(path, manifest, runtime, precision, options, startup)
    except (BundleError, BackendError, tritonconfig.ConfigError) as exc:
        raise ServeError(f"model {source.describe()!r}: {exc}") from None
    max_batch = min(settings.max_batch_size, backend.max_batch)
    delay_ms = None
    if config is not None:  # the repository's own configuration wins over the server's defaults, as in Triton
        if config.max_batch_size is not None:
            if config.max_batch_size > backend.max_batch:
                backend.close()
                raise ServeError(f"model {source.describe()!r}: config.pbtxt max_batch_size {config.max_batch_size} "
                                 f"is more than the artifact was exported for ({backend.max_batch})")
            max_batch = config.max_batch_size
        if config.max_queue_delay_us is not None:
            delay_ms = config.max_queue_delay_us / 1000
    return ServedModel(name, path, manifest, backend, max_batch, version=version, source=source,
                       queue_delay_ms=delay_ms, startup={k: round(v, 4) for k, v in startup.items()})


def load_models(settings: Settings) -> dict[str, ServedModel]:
    """Every configured model, by name; nothing is left loaded if one fails (and nothing is logged before)."""
    models: dict[str, ServedModel] = {}
    try:
        for source in model_sources(settings):
            model = load_model(source, settings)
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
    """Release every backend, the last loaded first: onnxruntime and OpenVINO loaded side by side crash the process
    at exit (SIGSEGV) when the one loaded first is released first."""
    for m in reversed(list(models.values())):
        m.backend.close()
