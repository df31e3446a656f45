"""The served models: bundle + verified backend + preprocessing, loaded once before the port is bound."""

from __future__ import annotations

import itertools
import logging
import os
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runtimes
from models import tritonconfig
from models.bundle import MANIFEST_FILE, NAME_RE, TRITON_CONFIG_FILE, BundleError, Manifest, read_manifest, unreadable
from models.bundle import NAME_RULE as BUNDLE_NAME_RULE
from models.cli import WorkFailed
from models.failures import out_of_memory
from models.host import MAX_THREADS, usable_cpus
from models.oneline import one_line
from models.preprocessing import Preprocessing
from models.triton_layout import is_version_name, misread_reason, misread_versions, version_dirs
from models.tritonconfig import ConfigError, Tensor, TritonConfig, VersionPolicy
from runtimes import Backend, BackendError, BackendOptions
from runtimes.base import MAX_PARALLEL, default_streams, description
from runtimes.loader import preprocessing_drift
from runtimes.registry import pick
from serve.batching import DynamicBatcher
from serve.errors import ServeError
from serve.settings import Settings, clipped, misnamed_model
from serve.stats import ModelStats

log = logging.getLogger("vitc.serve")
BUNDLE_VERSION = "1"  # a bundle served directly has one version
# A load reads its directory by path, in steps (manifest, files, golden inputs): `python -m export` (RENAME_EXCHANGE
# of the bundle) or `export.triton` (of the model directory) swapping it in between mixes the old and the new, which
# the checks refuse as tampered. The load is then made again from the new directory, whole, this many times at most.
LOAD_ATTEMPTS = 4
MAX_PEEK = 256  # directory entries looked at to tell what an empty --model-dir holds instead


class Unavailable(ServeError):
    """A repository model whose runtime cannot run here (not installed, or not on this device): the server
    starts without it and lists it unavailable, as Triton would."""

    def __init__(self, name: str, version: str, reason: str) -> None:
        super().__init__(reason)
        self.name, self.version = name, version


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
    config: TritonConfig | None = field(default=None, repr=False)  # the repository's config.pbtxt, as read
    label_file: list[str] | None = field(default=None, repr=False)  # the lines of its output's label_filename
    batcher: DynamicBatcher | None = field(default=None, repr=False)
    stats: ModelStats = field(default_factory=ModelStats, repr=False)
    users: int = field(default=0, repr=False)  # admitted requests on this version (a swap waits for them)
    startup: dict[str, float] = field(default_factory=dict, repr=False)  # seconds of each loading step
    # backend.describe() at load, as JSON data (runtimes.base.description; None: read at construction)
    execution: dict[str, Any] | None = field(default=None, repr=False)
    # The runtime it was loaded with (the Runtime's name, which --backend or its artifact chose): what it reports
    # and is tuned as. Never the backend's `runtime` attribute: a backend subclassing another runtime's keeps its
    # parent's (and reported that runtime's Triton platform), a typo in it answered 500.
    runtime: str = ""

    def __post_init__(self) -> None:
        if self.execution is None:  # once: a drained, closed backend cannot describe itself
            self.execution = {} if self.backend is None else description(self.backend, self.runtime or "backend")

    @property
    def spec(self) -> Preprocessing:
        return self.manifest.preprocessing

    def jpeg_draft(self, policy: str) -> bool:
        """Whether this model decodes big JPEGs in draft mode under the server's policy (`Manifest.jpeg_draft`)."""
        return self.manifest.jpeg_draft(policy)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def classification_labels(self) -> list[str] | None:
        """The labels of Triton's classification extension ("value:index:label"): a repository model's label file,
        None when its config.pbtxt names none ("value:index", as Triton answers); a bundle's class names."""
        return self.label_file if self.source is not None and self.source.repository else self.labels

    @property
    def label_filename(self) -> str:
        """The output's label_filename in the repository's config.pbtxt, as Triton reports it ("" when none)."""
        return (self.config.label_filename or "") if self.config is not None else ""

    @property
    def platform(self) -> str:
        """The Open Inference Protocol platform name, as Triton reports it."""
        return runtimes.get(self.runtime).triton_platform

    @property
    def triton_backend(self) -> str:
        """The Triton backend that serves this model's runtime ("" when Triton has none for it)."""
        return runtimes.get(self.runtime).triton_backend or ""

    @property
    def largest_request(self) -> int:
        """The most images one request may carry: the batch, within the queue's bound (a larger request could
        never be admitted)."""
        return min(self.max_batch, self.batcher.max_queue) if self.batcher else self.max_batch

    def info(self) -> dict[str, Any]:
        """The public description (GET /v1/models/{name})."""
        m = self.manifest
        return {
            "name": self.name,
            "variant": m.model,
            "stem": m.stem,
            "runtime": self.runtime,
            "precision": self.backend.precision,
            "device": self.backend.device,
            "execution": self.execution,  # what really runs: threads, compute precision, providers, ...
            "max_batch": self.largest_request,
            "input": {**m.input.to_dict(), "max_batch": self.largest_request},
            "output": m.output.to_dict(),
            "preprocessing": self.spec.to_dict(),
            "labels": self.labels,
            # Provenance without the exporting machine's paths.
            "source": {"dataset": m.source.dataset, "sha256": m.source.sha256},
            "version": self.version,
            "provenance": _printable(m.provenance.to_dict()) if m.provenance else None,
            "ready": bool(self.batcher and self.batcher.ready),
        }

    @property
    def backend_parameters(self) -> dict[str, str]:
        """The backend settings as applied, under Triton's parameter names (/v2 config): OpenVINO's hint, streams
        and threads, read back from the compiled model."""
        e = self.execution or {}
        return {key: str(e[name]) for name, key in (("performance_hint", "PERFORMANCE_HINT"),
                ("num_streams", "NUM_STREAMS"), ("inference_num_threads", "INFERENCE_NUM_THREADS")) if name in e}

    def provenance_labels(self) -> dict[str, str]:
        """A few provenance facts as short strings (metric labels, v2 metadata parameters)."""
        p = self.manifest.provenance
        return {"version": self.version, "weights_sha256": self.manifest.source.sha256[:12],
                "vitc_version": p.vitc_version if p else "unknown",
                "git_commit": (p.git_commit or "unknown")[:12] if p else "unknown",
                "exported": self.manifest.created}


def _printable(value: Any) -> Any:
    """`value` (JSON data) with its strings escaped as export.report prints them (models.oneline.one_line)."""
    # The training command is kept as training wrote it: a path's undecodable bytes are lone surrogates, which no
    # UTF-8 answer can encode (/v1/models answered 500 for every model), and an escape sequence would reach the
    # terminal of whoever prints the answer.
    if isinstance(value, str):
        return one_line(value)
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    return value


class ModelArgError(ServeError, ValueError):
    """A --model value that names no model (one line, exit 2); a ValueError too, as benchmarks.load takes it."""


def parse_model_arg(arg: str) -> tuple[str | None, Path]:
    """`path` or `name=path` -> (name or None, path); ModelArgError for `NAME=PATH` whose NAME no model can have
    while PATH is a directory and `arg` as a whole is none (serve.settings.misnamed_model)."""
    name, sep, path = arg.partition("=")
    if sep and NAME_RE.fullmatch(name):
        return name, Path(path)
    if why := misnamed_model(arg):
        raise ModelArgError(f"--model: {why}")
    return None, Path(arg)


@dataclass(frozen=True)
class ModelSource:
    """Where a served model comes from: a bundle directory, or a model directory of a Triton-style repository."""

    # A model directory holds numbered version directories, each a bundle, as `python -m export.triton` writes
    # them; the one its config.pbtxt's version_policy selects is served, by default the highest. Loading again
    # re-reads it: a bundle exported anew in place, or a new version directory, is what loads.

    path: Path
    name: str | None = None  # None: the bundle's own name
    repository: bool = False
    in_model_dir: bool = False  # a bundle directly under --model-dir

    @classmethod
    def model_dir_bundle(cls, path: Path) -> ModelSource:
        """A bundle directly under --model-dir: served under its directory's name, as Triton names a model, whether it
        was there at the start or is loaded later (a manifest's name would rename it at a restart, or clash)."""
        return cls(path, path.name, in_model_dir=True)

    def versions(self) -> list[str]:
        """The numbered version directories, oldest first (with or without a manifest: a broken one is reported,
        never silently passed over); BundleError when the model directory cannot be read."""
        if not self.repository:
            return [BUNDLE_VERSION]
        try:
            return [str(v) for v in version_dirs(self.path)]
        except OSError as exc:  # a model directory this process may not list or look into
            raise unreadable("model directory", self.path, exc) from None

    def selected(self) -> tuple[str, Path, TritonConfig | None]:
        """(version, bundle directory, config.pbtxt or None) that loads: the bundle itself, or the repository
        version its config's version_policy picks; BundleError or ConfigError when there is none."""
        if not self.repository:
            return BUNDLE_VERSION, self.path, None
        try:
            config = tritonconfig.read(self.path)
        except OSError as exc:  # it cannot tell whether config.pbtxt is there in a directory it may not look into
            raise unreadable("model directory", self.path, exc) from None
        versions = self.versions()
        policy = config.version_policy if config is not None else VersionPolicy()
        try:
            misread = misread_versions(self.path)
        except OSError as exc:
            raise unreadable("model directory", self.path, exc) from None
        # Triton reads "5.bak" as version 5 and opens "5/": where a version its policy loads has no directory of its
        # own, Triton cannot load the model, and vitc must not serve another version in its place.
        loaded = set(policy.loads([int(v) for v in versions] + list(misread.values())))
        for name, version in sorted(misread.items()):
            if version in loaded:
                raise BundleError(misread_reason(name, version))
        if not versions:
            raise BundleError(f"model directory {self.path} has no version directory (1/, 2/, ...)")
        version = str(policy.pick([int(v) for v in versions]))
        return version, self.path / version, config

    def describe(self) -> str:
        """The model as the command line gives it: NAME=PATH, or PATH (a --model-dir bundle: its directory)."""
        return f"{self.name}={self.path}" if self.name and not self.in_model_dir else str(self.path)


def has_manifest(version_dir: Path) -> bool:
    """Whether a repository version directory holds its manifest; BundleError when it cannot be looked into."""
    try:
        return (version_dir / MANIFEST_FILE).is_file()
    except OSError as exc:  # is_file answers False only for a missing file: EACCES and EIO are raised
        raise unreadable("version directory", version_dir, exc) from None


def _model_dir_bundles(root: Path, named: str) -> list[Path]:
    """The bundle directories directly under --model-dir (hidden ones aside); ServeError when it cannot be read,
    naming it `named` (as the user gave it, Settings.named)."""
    try:
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise ServeError(f"{named}: cannot read it: {exc.strerror or exc}") from None
    bundles, closed = [], []
    for p in entries:
        try:
            if (p / MANIFEST_FILE).is_file():
                bundles.append(p)
        except OSError as exc:  # EACCES, EIO: is_file answers False only for what is missing
            closed.append(f"{p.name}: {exc.strerror or exc}")
    if closed:  # said, not fatal: it may be no bundle at all (a mounted volume's lost+found is root's alone)
        log.warning("--model-dir directories that cannot be looked into are not served",
                    extra={"directories": closed[:16]})
    return bundles


def model_sources(settings: Settings) -> list[ModelSource]:
    """--model values, every bundle directly under --model-dir, every model of --model-repository; ServeError when
    there is none, but in the explicit model control mode with a directory to load models from later."""
    sources = [ModelSource(path, name) for name, path in map(parse_model_arg, settings.models)]
    # Named as the user gave them: the image's VITC_MODEL_DIR=/models unmounted is no --model-dir of the user's.
    model_dir, repository = (_named(settings, n) for n in ("model_dir", "model_repository"))
    for named, root in ((model_dir, settings.model_dir), (repository, settings.model_repository)):
        try:
            is_dir = root is None or root.is_dir()
        except OSError as exc:  # Path.is_dir raises EACCES (a parent that cannot be searched) on Python 3.11
            raise ServeError(f"{named}: {exc.strerror or exc}") from None
        if not is_dir:
            raise ServeError(f"{named} is not a directory")
    if settings.model_dir is not None:
        # A bundle also given with --model is served once, as --model says. Hidden directories are an export's
        # temporaries (a killed export leaves one): never models.
        given = given_paths(sources)
        for p in _model_dir_bundles(settings.model_dir, model_dir):
            if given and resolved_path(p) in given:
                continue
            if not NAME_RE.fullmatch(p.name):  # refused, not skipped: a client would find its model gone
                raise ServeError(misnamed(f"bundle {p} of {model_dir}",
                                          f"rename the directory, or serve it with --model {shlex.quote(f'NAME={p}')}"))
            sources.append(ModelSource.model_dir_bundle(p))
    if settings.model_repository is not None:
        try:
            sources += [ModelSource(p, p.name, repository=True) for p in sorted(settings.model_repository.iterdir())
                        if p.is_dir() and not p.name.startswith(".") and NAME_RE.fullmatch(p.name)]
        except OSError as exc:
            raise ServeError(f"{repository}: cannot read it: {exc.strerror or exc}") from None
    roots = [named for named, root in ((model_dir, settings.model_dir), (repository, settings.model_repository))
             if root is not None]
    if not sources and roots and settings.model_control_mode == "explicit" and _misplaced(settings) is None:
        # As Triton's explicit mode: a server may start empty and have its models loaded later over the repository
        # API; strict readiness keeps it not ready until one is.
        log.warning("no models to serve yet", extra={"directories": roots, "reason": (
            "load one with POST /v2/repository/models/NAME/load (explicit model control mode); /v2/health/ready "
            "answers 400 until then, unless --no-strict-readiness")})
    elif not sources:
        raise ServeError(_nothing_to_serve(settings))
    return sources


def _named(settings: Settings, setting: str) -> str:
    """A directory setting as a refusal names it: `VITC_MODEL_DIR=/models`, or `--model-dir /models`."""
    return settings.named(setting, f" {clipped(str(getattr(settings, setting)))}")


NAME_RULE = f"a model name is {BUNDLE_NAME_RULE}"  # models.bundle's rule, worded to end a refusal's reason


def misnamed(what: str, advice: str = "rename the directory") -> str:
    """The refusal of a directory (a repository's model, a --model-dir bundle) whose name no model can have."""
    return f"{what} is not served: {NAME_RULE} ({advice})"


def given_paths(sources: Iterable[ModelSource]) -> set[Path]:
    """The bundles --model gives, resolved: one of them that lies under --model-dir is served once, as --model names
    it (the Docker image sets VITC_MODEL_DIR=/models, and `--model /models/x` is the natural flag to add)."""
    return {resolved_path(s.path) for s in sources if not s.in_model_dir and not s.repository}


def unservable_dirs(root: Path, limit: int = 16) -> list[str]:
    """Directories of a repository that are not models because of their name (hidden ones aside): at most `limit`
    of the first 10,000 entries, for a log line."""
    try:
        with os.scandir(root) as it:
            names = [e.name for e in itertools.islice(it, 10_000)
                     if not e.name.startswith(".") and not NAME_RE.fullmatch(e.name) and e.is_dir()]
    except OSError:
        return []
    return sorted(names)[:limit]


def resolved_path(path: Path) -> Path:
    """`path` with its links and `..` resolved, to tell one bundle given two ways."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compared as given
        return path


def _nothing_to_serve(settings: Settings) -> str:
    """Why no model was found, naming the directories that were looked in (and what one holds instead)."""
    advice = "pass --model PATH (or name=PATH), --model-dir DIR or --model-repository DIR"
    if settings.model_repository is not None:
        return f"no models to serve: {_named(settings, 'model_repository')} holds no model directory"
    if settings.model_dir is None:
        return f"no models to serve: {advice}"
    found = f"no models to serve: {_named(settings, 'model_dir')} holds no bundle (DIR/*/{MANIFEST_FILE})"
    return f"{found}; {_misplaced(settings) or advice}"


def _misplaced(settings: Settings) -> str | None:
    """What --model-dir's directory holds instead of bundles, when it holds models in another layout (a Triton
    repository, or one bundle itself), with the flag that serves it; None otherwise. Refused even in explicit
    model control mode, where an empty directory is allowed: no load could ever find those models."""
    root = settings.model_dir
    if root is None:
        return None
    if (root / MANIFEST_FILE).is_file():
        return f"it is a bundle itself: serve it with --model {shlex.quote(str(root))}"
    if _looks_like_repository(root):
        return f"it looks like a Triton model repository: serve it with --model-repository {shlex.quote(str(root))}"
    return None


def _looks_like_repository(root: Path) -> bool:
    """Whether `root` holds model directories of a Triton repository (a config.pbtxt or a numbered version
    directory with a manifest); a bounded look."""
    try:
        for model in itertools.islice(root.iterdir(), MAX_PEEK):
            if model.is_dir() and ((model / TRITON_CONFIG_FILE).is_file() or any(
                    is_version_name(v.name) and (v / MANIFEST_FILE).is_file()
                    for v in itertools.islice(model.iterdir(), MAX_PEEK))):
                return True
    except OSError:
        pass
    return False


def load_model(source: ModelSource | str, settings: Settings, label: str | None = None) -> ServedModel:
    """Read, verify and load one model (a bundle, or the repository version its config selects); ServeError with
    one line (Unavailable: a repository model whose runtime cannot run here), calling the model `label` (by default
    as the command line gives it, NAME=PATH or PATH; a load requested over HTTP passes its name). A directory
    replaced while it loaded (an export swapping it in) is loaded again, up to LOAD_ATTEMPTS times."""
    if isinstance(source, str):
        name, path = parse_model_arg(source)
        source = ModelSource(path, name)
    label = source.describe() if label is None else label
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        before = _identity(source.path)
        try:
            model = _load_once(source, settings, label)
        except ServeError:
            if _identity(source.path) == before:  # nothing was swapped: the reason is the model's own
                raise
            if attempt == LOAD_ATTEMPTS:  # never the mix's verdict ("tampered"): it describes no bundle
                # Its directory is not named: a load's answer tells no client where the models lie.
                raise ServeError(f"model {label!r}: its directory was replaced while it was loaded, {LOAD_ATTEMPTS} "
                                 "times in a row (an export writing it?): load it again once the export ends") from None
        else:
            if _identity(source.path) == before or attempt == LOAD_ATTEMPTS:  # last: verified, if not the newest
                return model
            model.backend.close()  # it loaded, but may pair one directory's config with the other's version
        log.info("model replaced while it loaded: loading it again",
                 extra={"model": label, "path": str(source.path), "attempt": attempt + 1})
    raise AssertionError("unreachable")  # the loop returns or raises at its last attempt


def _identity(path: Path) -> tuple[int, int] | None:
    """What tells the directory at `path` from one swapped in for it: its device and inode (a file written inside
    it, or edited, changes neither: only a swap makes a load start again); None if it is not there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _load_once(source: ModelSource, settings: Settings, label: str) -> ServedModel:
    """One attempt of `load_model`."""
    start = time.perf_counter()
    try:
        version, path, config = source.selected()
        if source.repository and not has_manifest(path):
            raise BundleError(f"version directory {path} has no {MANIFEST_FILE} (empty, or still being copied?): "
                              "finish it or remove it, then load again")
        manifest = read_manifest(path)
        name = source.name or manifest.name
        if not NAME_RE.fullmatch(name):
            raise ServeError(f"model name {name!r} must match {NAME_RE.pattern} (use --model name=PATH)")
        runtime, device = _runtime_and_device(source, manifest, config, settings)
        labels = None
        if source.repository:
            _check_repository_model(source, version, manifest, runtime, device, config)
            if config is not None:  # read as Triton reads it at load: a label file it cannot read fails the load
                labels = config.labels(source.path, manifest.output.classes)
        options = _backend_options(source, config, settings, runtime, device)
        ignored = _unapplied_parameters(config, runtime, options) if source.repository else ()
        flags = _unapplied_flags(config, runtime, settings, options) if source.repository else ()
        precision = None if source.repository else settings.precision
        startup = {"read_manifest": time.perf_counter() - start}
        backend = runtimes.open_backend(path, manifest, runtime, precision, options, startup)
    except (BundleError, BackendError, ConfigError) as exc:
        raise ServeError(f"model {label!r}: {exc}") from None
    try:
        _warn_on_config(name, version, manifest, config, labels, ignored, flags)
        _warn_on_preprocessing_drift(name, path, manifest)
        max_batch, delay_ms = _batching(label, config, settings, backend.max_batch)
        # Checked at open too: a plugin's describe() that answers otherwise now is one line, not a crash or a 500.
        execution = description(backend, runtime)
    except BaseException as exc:
        backend.close()
        if isinstance(exc, BackendError):
            raise ServeError(f"model {label!r}: {exc}") from None
        raise
    return ServedModel(name, path, manifest, backend, max_batch, version=version, source=source,
                       queue_delay_ms=delay_ms, config=config, label_file=labels,
                       stats=ModelStats(unbatched=config is not None and config.max_batch_size == 0),
                       startup={k: round(v, 4) for k, v in startup.items()}, runtime=runtime, execution=execution)


def _runtime_and_device(source: ModelSource, manifest: Manifest, config: TritonConfig | None,
                        settings: Settings) -> tuple[str, str]:
    """The runtime and device a model runs on: the server's, except for a repository version, which holds one
    artifact (python -m export.triton) and runs on that artifact's runtime, on the CPU when its config.pbtxt puts
    every instance there (as Triton does on a GPU machine)."""
    runtime = manifest.servable()[0].runtime if source.repository and manifest.servable() else settings.backend
    device = "cpu" if config is not None and config.cpu_only else settings.device
    return runtime, device


def _backend_options(source: ModelSource, config: TritonConfig | None, settings: Settings, runtime: str,
                     device: str) -> BackendOptions:
    """How the backend runs: the server's tuning settings, with a repository model's CPU threads sized from its
    config.pbtxt; BackendError or ConfigError with one line."""
    threads, hint, parallel = settings.threads, settings.openvino_hint, settings.parallel
    if source.repository and config is not None and device == "cpu":
        rt = runtimes.get(runtime)
        hint, parallel = _repository_streams(config, rt, settings)
        # As Triton's backend sizes one instance, within the CPUs this container may use (Triton oversubscribes).
        if threads is None and (wanted := config.threads(rt.triton_threads)) is not None:  # the instances as one
            wanted = min(wanted if rt.triton_threads_shared else wanted * config.instance_count, usable_cpus(),
                         MAX_THREADS)  # a host of over 1024 CPUs: what BackendOptions takes
            threads, parallel = _per_inference(wanted, hint, parallel) if rt.triton_threads_shared else (wanted,
                                                                                                        parallel)
    # A compiled model is prepared only for the batch sizes this server can form (each one costs start time); a
    # repository model's batch size is its config.pbtxt's, known once loaded: the bundle's bounds it then.
    max_batch = settings.max_batch_size if settings.compile and not source.repository else None
    return BackendOptions(device=device, threads=threads, parallel=parallel, hint=hint,
                          compile=settings.compile, channels_last=settings.channels_last, max_batch=max_batch)


HINT_PARAMETER = "PERFORMANCE_HINT"  # Triton's OpenVINO backend's, applied as --openvino-hint


def _repository_streams(config: TritonConfig, rt: runtimes.Runtime, settings: Settings) -> tuple[str, int | None]:
    """(hint, parallel) of a repository model: its config.pbtxt's PERFORMANCE_HINT and stream count where the
    server's flags do not say (the rule its threads follow); the latency hint runs one stream."""
    hint = settings.openvino_hint
    if "openvino_hint" in rt.tunes and "openvino_hint" not in settings.model_fields_set:
        hint = config.performance_hint(HINT_PARAMETER) or hint
    parallel = settings.parallel
    if parallel is None and hint == "throughput":
        parallel = config.streams(rt.triton_streams, MAX_PARALLEL)
    return hint, parallel


def _per_inference(total: int, hint: str, parallel: int | None) -> tuple[int, int | None]:
    """(threads of one inference, streams) of a model whose threads parameter is the whole model's (OpenVINO's
    INFERENCE_NUM_THREADS): `total` split among its streams, vitc's default count of them when none is given, so
    that the model keeps within `total` (the pod's CPU limit export.triton wrote)."""
    if hint != "throughput":
        return total, parallel
    streams = min(parallel or default_streams(total), total)
    return max(1, total // streams), streams


def _unapplied_parameters(config: TritonConfig | None, runtime: str, options: BackendOptions) -> tuple[str, ...]:
    """The config.pbtxt parameters vitc does not apply to the model (HINT_BF16: vitc keeps the artifact's precision;
    a stream count beside the latency hint, which runs one), as `parameters.KEY`."""
    if config is None:
        return ()
    rt = runtimes.get(runtime)
    applied = {rt.triton_threads, "ENABLE_BATCH_PADDING" if rt.triton_fixed_batch else None}  # padding: none needed
    if "openvino_hint" in rt.tunes and config.performance_hint(HINT_PARAMETER) is not None:
        applied.add(HINT_PARAMETER)
    streams = rt.triton_streams and config.parameters.get(rt.triton_streams, "").strip()
    if streams and (streams.upper() == "AUTO" or config.streams(rt.triton_streams, MAX_PARALLEL) is not None) and (
            options.hint == "throughput" or config.streams(rt.triton_streams, MAX_PARALLEL) == 1):
        applied.add(rt.triton_streams)  # AUTO: OpenVINO's own count, as without it
    return tuple(f"parameters.{key}" for key in config.parameters if key not in applied)


def _unapplied_flags(config: TritonConfig | None, runtime: str, settings: Settings,
                     options: BackendOptions) -> tuple[str, ...]:
    """The server's flags a repository model's config.pbtxt overrides: --parallel beside its latency hint, which
    compiles one stream (runtimes.openvino.layout), as `--parallel N (parameters.KEY VALUE runs one stream)`."""
    # The CLI refuses --openvino-hint latency --parallel 2; one model's hint must not stop a server of many, so the
    # flag is named for that model instead of dropped without a word.
    if (config is None or not runtimes.get(runtime).triton_streams or options.hint == "throughput"
            or (settings.parallel or 1) <= 1):
        return ()
    return (f"--parallel {settings.parallel} (parameters.{HINT_PARAMETER} {options.hint.upper()} runs one stream)",)


def _warn_on_config(name: str, version: str, manifest: Manifest, config: TritonConfig | None,
                    labels: list[str] | None, parameters: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> None:
    """Log what a repository model's config.pbtxt says that vitc does not apply (its fields, and `parameters`), or
    the server's `flags` it overrides, or says otherwise than the bundle (its label file's names)."""
    fields = [*config.unapplied, *parameters] if config is not None else []
    if fields or flags:  # accepted as Triton accepts them, but said
        advice = [*(["vitc serves the model without the fields (Triton would apply them)"] if fields else []),
                  *(["its config.pbtxt decides for it over the flags (PERFORMANCE_HINT THROUGHPUT runs streams)"]
                    if flags else []), "see the README's Triton section"]
        log.warning("config.pbtxt settings not applied", extra={
            "model": name, "version": version, "fields": fields, **({"flags": list(flags)} if flags else {}),
            "advice": "; ".join(advice)})
    if labels is not None and list(labels) != list(manifest.class_names):
        # Both are served, each where Triton or vitc reads it: say so once rather than let two names for one class
        # surprise a client (the label file has one line per class: `labels` checked that).
        changed = sum(a != b for a, b in zip(labels, manifest.class_names, strict=True))
        log.warning("label file differs from the bundle's classes", extra={
            "model": name, "version": version, "label_filename": config.label_filename, "lines_differing": changed,
            "advice": "the v2 classification extension answers with the label file's names (as Triton does), /v1 "
                      "with the bundle's; export the model again to make them agree"})


def _batching(label: str, config: TritonConfig | None, settings: Settings,
              backend_max_batch: int) -> tuple[int, float | None]:
    """(max batch, queue delay in ms or None for the server's setting) of a loaded model: the server's settings
    within what the backend takes, unless the repository's own config.pbtxt decides, as in Triton; ServeError
    calling the model `label`."""
    max_batch = min(settings.max_batch_size, backend_max_batch)
    if config is None:
        return max_batch, None
    if config.max_batch_size is not None:
        if config.max_batch_size > backend_max_batch:
            raise ServeError(f"model {label!r}: config.pbtxt max_batch_size {config.max_batch_size} "
                             f"is more than the artifact was exported for ({backend_max_batch})")
        # 0: Triton does not batch (requests never merge: TritonConfig.dynamic_batching is False) and each
        # request carries its own batch dimension, up to what the artifact takes.
        max_batch = config.max_batch_size or backend_max_batch
    # Triton's defaults: dynamic_batching without a delay waits 0; without the block nothing waits.
    return max_batch, (config.max_queue_delay_us or 0) / 1000


def _warn_on_preprocessing_drift(name: str, path: Path, manifest: Manifest) -> None:
    """Log a warning when this machine preprocesses the bundle's golden sources unlike the export did (another
    Pillow): answers then shift from the accuracy the bundle was certified with, which no artifact check sees."""
    try:
        drift = preprocessing_drift(path, manifest)
    except BundleError as exc:  # open_backend read the same file a moment ago: only a change since lands here
        raise ServeError(f"model {name!r}: {exc}") from None
    if drift is not None:
        pillow = (manifest.provenance.libraries.get("pillow") if manifest.provenance else None) or "unknown"
        log.warning("preprocessing differs from the export's", extra={
            "model": name, **drift, "export_pillow": pillow, "pillow": _pillow_version(),
            "advice": "serve with the Pillow the bundle was exported with, or re-export the bundle here"})


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def _check_repository_model(source: ModelSource, version: str, manifest: Manifest, runtime: str, device: str,
                            config: TritonConfig | None) -> None:
    """ConfigError when config.pbtxt contradicts the artifact; Unavailable when its runtime cannot run here (unknown,
    not installed, not on this device, or a name a plugin that failed to register claimed too), naming the model by
    its name alone: the reason is what the index and a request for it answer."""
    try:
        rt = pick(runtime)  # a failed plugin's name: refused, not served by the runtime that has it
    except BackendError as exc:
        raise Unavailable(source.path.name, version, f"model {source.path.name!r}: {exc}") from None
    if config is not None:
        c, h, w = manifest.input.sample_shape
        try:
            config.check(name=source.path.name, platform=rt.triton_platform, backend=rt.triton_backend,
                         input=Tensor(manifest.input.name, "TYPE_FP32", (c, h, w)),
                         output=Tensor(manifest.output.name, "TYPE_FP32", (manifest.output.classes,)),
                         rules=rt.triton_rules(runtimes.runtimes()))
            # The file Triton's backend opens by default: the artifact's, under the name export.triton gives it.
            config.check_files(source.path / version, rt.triton_files[0][1] if rt.triton_files else None)
            if (rt.triton_fixed_batch and config.max_batch_size
                    and config.parameters.get("ENABLE_BATCH_PADDING", "").lower() != "yes"):
                # vitc serves it, but the same repository would not load in Triton (the layout earlier versions of
                # export.triton wrote): said where an operator looks.
                log.warning("config.pbtxt Triton cannot load", extra={
                    "model": source.path.name, "reason": f"max_batch_size {config.max_batch_size} on Triton's "
                    "OpenVINO backend refuses every other batch size (the warm-up too); python -m export.triton "
                    "regenerates an unedited config, an edited one needs max_batch_size: 0 with dims [ -1, ... ]"})
        except ConfigError as exc:
            raise ConfigError(f"{source.path / TRITON_CONFIG_FILE}: {exc}") from None
    try:
        rt.require(device)
    except BackendError as exc:
        raise Unavailable(source.path.name, version, f"model {source.path.name!r}: {exc}") from None


class ServedModels(dict[str, ServedModel]):
    """The loaded models by name, and the repository models left unloaded because their runtime cannot run here
    (`skipped`: name -> (version, reason))."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, tuple[str, str]] = {}


def load_models(settings: Settings) -> ServedModels:
    """Every configured model, by name; nothing is left loaded if one fails (and nothing is logged before). A
    repository model whose runtime is not installed here (or not on this device) is skipped with one log line."""
    models = ServedModels()
    if settings.model_repository is not None and (odd := unservable_dirs(settings.model_repository)):
        log.warning("repository directories skipped", extra={"directories": odd, "reason": NAME_RULE})
    try:
        for source in model_sources(settings):
            try:
                model = load_model(source, settings)
            except MemoryError as exc:  # the machine (exit 1), said with the model it stopped at
                raise WorkFailed(f"cannot load model {source.name or str(source.path)!r}: "
                                 f"{out_of_memory(exc) or 'out of memory'}") from exc
            except Unavailable as exc:
                models.skipped[exc.name] = (exc.version, str(exc))
                remedy = {"not_ready": unavailable_remedy(settings, exc.name)} if settings.strict_readiness else {}
                log.warning("model unavailable", extra={"model": exc.name, "reason": str(exc), **remedy})
                continue
            if model.name in models:
                model.backend.close()
                raise ServeError(_clash(models[model.name], model))
            models[model.name] = model
    except BaseException:
        close_models(models)
        raise
    return models


def unavailable_remedy(settings: Settings, name: str) -> str:
    """How a server kept not ready by strict readiness for its unavailable model `name` gets back to ready: a
    Kubernetes rollout of a broken model stalls rather than take traffic, but the log says how to end it."""
    unload = f"POST /v2/repository/models/{name}/unload"
    if settings.model_control_mode == "explicit":
        return (f"/v2/health/ready answers 400 until the model is unloaded ({unload}) or loaded again once fixed "
                f"(POST /v2/repository/models/{name}/load), or the server restarts with --no-strict-readiness "
                "(VITC_STRICT_READINESS=false)")
    # vitc never watches the repository (no poll mode), and the none mode refuses an unload: a restart is needed.
    return ("/v2/health/ready answers 400 for as long as this server runs: the directories are not watched and the "
            "model control mode none refuses an unload; fix or remove the model and restart, or restart with "
            f"--model-control-mode explicit (VITC_MODEL_CONTROL_MODE=explicit; then {unload}) or with "
            "--no-strict-readiness (VITC_STRICT_READINESS=false)")


def _clash(first: ServedModel, second: ServedModel) -> str:
    """The refusal of two models given one name, with the fix that applies: a directory names a --model-dir bundle
    or a repository model, --model NAME=PATH any other."""
    dirs = [m.source.path for m in (first, second) if m.source is not None
            and (m.source.in_model_dir or m.source.repository)]
    if not dirs:
        advice = "rename one with --model name=PATH"
    elif len(dirs) == 2:
        advice = "rename one of the directories"
    else:
        advice = f"rename the directory {dirs[0]}, or give the --model another name (--model NAME=PATH)"
    return f"two models are named {first.name!r} ({first.bundle} and {second.bundle}); {advice}"


def close_models(models: dict[str, ServedModel]) -> None:
    """Release every backend, the last loaded first: onnxruntime and OpenVINO loaded side by side crash the process
    at exit (SIGSEGV) when the one loaded first is released first."""
    for m in reversed(list(models.values())):
        m.backend.close()
