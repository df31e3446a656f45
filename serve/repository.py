"""The served models as a live set: load (again), unload and index them while serving (the Open Inference
Protocol repository extension), with a swap that no request notices.

A load reads the model's source again (its bundle, or the version of its repository directory that its
config.pbtxt selects, by default the newest), verifies every file, proves the golden inputs and warms the runtime,
all off the event loop, while the old version keeps serving. Only then does the name point to the new version; the
old one is drained (every request admitted to it is answered) and closed. A load that fails leaves the old
version serving and answers the reason, naming files relative to the model directory (`config.pbtxt`, `2/`): no
client learns where the models lie. Loads, failed loads (a warning with the reason, full paths included) and unloads
are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import MANIFEST_FILE, MAX_MANIFEST_BYTES, BundleError, safe_component
from models.io import read_regular_file
from models.tritonconfig import ConfigError
from serve.batching import DynamicBatcher
from serve.errors import ServeError
from serve.metrics import Metrics
from serve.registry import (
    NAME_RE,
    NAME_RULE,
    ModelSource,
    ServedModel,
    ServedModels,
    close_models,
    given_paths,
    has_manifest,
    load_model,
    misnamed,
    resolved_path,
)
from serve.settings import Settings
from serve.stats import Observers
from serve.workpool import ThreadsUnavailable, started_pool, thread_start_failed

log = logging.getLogger("vitc.serve")
MAX_LISTED = 4096  # directory entries of a repository looked at for its index
KNOWN_SAID = 20  # names a load of an unknown model is told of
MAX_FINGERPRINTED = 256  # files of a failed version whose state is kept, to tell whether they changed since
LOAD_THREADS = "vitc-load"  # the name of the threads loads run in (serve.server names them when they outlive a stop)
# Loads run one at a time, in a thread started with the server: a pool that started its threads at the first load
# failed every load under a pids limit (a 500 with a traceback), and a thread started for a job that is queued anyway
# would run it later, unawaited. One at a time also bounds the memory of loads (each holds a whole model beside the
# one it replaces) and the cores they share (each warms its runtime on all of them).
LOADERS = 1


class LoadError(Exception):
    """A model could not be loaded (or unloaded): the reason, in one line; what served before still serves."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why the last load of one version failed, and its directory's files as they were then (None: no directory)."""

    reason: str
    files: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Serving:
    """A served model as the index reads it, taken on the event loop: its version, and whether it takes requests."""

    version: str
    ready: bool


@dataclasses.dataclass
class _Turn:
    """One model name's lock, and how many loads or unloads hold or await it."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


class _Known:
    """What a server knows of its models beside the served ones (where each loads from, why a load failed, which
    were unloaded), and what both the repository and its index read of it."""

    settings: Settings
    sources: dict[str, ModelSource]
    # (name, version) -> why its last load failed; at start, the repository models whose runtime cannot run here.
    failures: dict[tuple[str, str], Failure]
    unloaded: set[str]

    def serves(self, name: str) -> bool:
        """Whether a version of `name` is served."""
        raise NotImplementedError

    def source_of(self, name: str) -> ModelSource:
        """Where `name` loads from: the source it was served from, or a directory of --model-repository; LoadError
        when nothing holds it: a name no model can have says so, another names what is known."""
        if (source := self._located(name)) is None:
            if not NAME_RE.fullmatch(name):  # ".hidden", "-x", 129 characters: no listing would ever hold it
                raise LoadError(f"{name[:200]!r} is not a model name: {NAME_RULE}")
            raise LoadError(f"no model {name[:200]!r} in the repository; known: {_some(self.listed())}")
        return source

    def _located(self, name: str) -> ModelSource | None:
        """`source_of` without listing the known names (the index asks for every name it lists: listing the
        repository again for each unknown one would make it quadratic); LoadError for a misnamed directory."""
        if name in self.sources:
            return self.sources[name]
        root = self.settings.model_repository
        if root is not None and NAME_RE.fullmatch(name) and (root / name).is_dir():
            return ModelSource(root / name, name, repository=True)
        if (bundle := self._bundle(name)) is not None:  # exported into --model-dir after the start
            return bundle
        if safe_component(name) and not name.startswith(".") and self._misnamed(name):
            # Named as the request named it: a load's answer tells no client where the repository lies.
            raise LoadError(misnamed(f"model directory {name[:200]!r}"))
        return None

    def listed(self) -> list[str]:
        """The names the repository index lists, sorted: every source, model directory or bundle on disk, and name whose
        last load failed (its directory gone or not)."""
        return sorted(set(self.sources) | set(self._on_disk()) | {n for n, _ in self.failures})

    def _on_disk(self) -> list[str]:
        """The model directories of --model-repository and the bundles directly under --model-dir, loaded or not (at
        most MAX_LISTED of each are looked at), by the names they load as."""
        names = [e.name for e in _listed(self.settings.model_repository) if NAME_RE.fullmatch(e.name) and e.is_dir()]
        given = given_paths(self.sources.values())
        return names + [e.name for e in _listed(self.settings.model_dir) if self._bundle(e.name, given) is not None]

    def _bundle(self, name: str, given: set[Path] | None = None) -> ModelSource | None:
        """The bundle `name` directly under --model-dir, as a start would serve it: under its directory's name, unless
        a --model serves it (under the name --model gives it); None when there is none. `given`: given_paths."""
        root = self.settings.model_dir
        if root is None or not NAME_RE.fullmatch(name) or not _is_file(root / name / MANIFEST_FILE):
            return None
        given = given_paths(self.sources.values()) if given is None else given
        return None if given and resolved_path(root / name) in given else ModelSource.model_dir_bundle(root / name)

    def _misnamed(self, name: str) -> bool:
        """Whether `name`, which no model can have, is a directory of --model-repository or a bundle under
        --model-dir (a load of it is told to rename it, as a start refuses or skips it)."""
        repository, bundles = self.settings.model_repository, self.settings.model_dir
        return not NAME_RE.fullmatch(name) and (
            (repository is not None and _is_dir(repository / name))
            or (bundles is not None and _is_file(bundles / name / MANIFEST_FILE)))

    def why_not_served(self, name: str) -> str | None:
        """Why a model the server knows is not served (its last load's failure, or an unload); None otherwise."""
        if self.serves(name):
            return None
        if name in self.unloaded:  # the latest news: a load that failed earlier was superseded by the unload
            return f"unloaded (load it again: POST /v2/repository/models/{name}/load)"
        reasons = [failed.reason for (n, _), failed in self.failures.items() if n == name]
        return reasons[-1] if reasons else None

    def _public(self, name: str, version: str, reason: str) -> str:
        """`reason` as a client may read it: every path into a directory `name` may load from (or into a root the
        server was given) named relative to it: `config.pbtxt`, `2/model.onnx`, never where the models lie."""
        repository, bundles = self.settings.model_repository, self.settings.model_dir
        places = []
        if (known := self.sources.get(name)) is not None:
            places.append((known.path, known.repository))
        if repository is not None and NAME_RE.fullmatch(name):
            places.append((repository / name, True))
        if bundles is not None and NAME_RE.fullmatch(name):
            places.append((bundles / name, False))
        named = [_Place(path / version, version, f"{version}/") for path, versioned in places if versioned and version]
        named += [_Place(path, path.name, "") for path, _ in places]
        named += [_Place(root, flag, "") for root, flag in ((repository, "--model-repository"),
                                                            (bundles, "--model-dir")) if root is not None]
        return without_places(reason, named)

    def _files_now(self, name: str, version: str) -> tuple | None:
        """The files of `name`'s version directory (its bundle's, out of a repository) as they are now; None when there
        is none, or no version was chosen."""
        if not version:
            return None
        try:
            source = self._located(name)
        except LoadError:
            return None
        if source is None:
            return None
        return _fingerprint(source.path / version if source.repository else source.path)


class ModelRepository(_Known):
    """The models one server serves, by name; `models` is the dict the routes read."""

    def __init__(self, settings: Settings, metrics: Metrics, models: dict[str, ServedModel]) -> None:
        self.settings, self.metrics, self.models = settings, metrics, models
        self.sources = {m.name: m.source or ModelSource(m.bundle, m.name) for m in models.values()}
        self.failures = {(name, version): Failure(self._public(name, version, reason), self._files_now(name, version))
                         for name, (version, reason) in
                         (models.skipped.items() if isinstance(models, ServedModels) else ())}
        self.unloaded = set()
        self._turns: dict[str, _Turn] = {}  # only names being loaded or unloaded: bounded by the work in progress
        self._retiring: set[asyncio.Task] = set()
        # Loads run in threads of their own, not the loop's default executor: asyncio.run waits for that one at exit,
        # so a SIGTERM during a long load (a TensorRT engine build) would keep the process up until the load ended.
        self._loader: ThreadPoolExecutor | None = None  # started by start_threads

    def start_threads(self) -> None:
        """Start the loads' thread and the inference threads of every model loaded before the server bound its port,
        if not yet; needs no event loop (the server starts them before it says it listens). ThreadsUnavailable names
        the first that cannot start, and none of them is left running."""
        if self._loader is not None:
            return
        loader = started_pool(LOADERS, LOAD_THREADS, "the thread of the repository's loads")
        try:
            for model in self.models.values():
                if model.batcher is None:
                    model.batcher = self._batcher(model)
                model.batcher.start_threads()
        except BaseException:
            for model in self.models.values():
                if model.batcher is not None:
                    model.batcher.discard()
                    model.batcher = None
            loader.shutdown()
            raise
        self._loader = loader

    async def start(self) -> None:
        """Start a batcher for every model loaded before the server bound its port (and their threads, unless
        `start_threads` did). A repository model that failed to load then gets readiness and queue-depth series at
        0, as an unloaded one has."""
        self.start_threads()
        for model in self.models.values():
            await self._activate(model)
        for name, _ in self.failures:
            self.metrics.not_served(name)

    def _batcher(self, model: ServedModel) -> DynamicBatcher:
        s = self.settings
        return DynamicBatcher(
            model.name, model.backend.infer, max_batch=model.max_batch,
            max_delay_s=(s.max_queue_delay_ms if model.queue_delay_ms is None else model.queue_delay_ms) / 1000,
            max_queue=s.max_queue_size, parallel=model.backend.parallelism,
            observer=Observers(self.metrics, model.stats), timeout_s=s.inference_timeout_s,
            probe=np.zeros((1, *model.manifest.input.sample_shape), np.float32),
            merge=model.config is None or model.config.dynamic_batching, classes=model.manifest.output.classes,
        )

    async def _activate(self, model: ServedModel) -> None:
        """Start `model`'s batcher (ThreadsUnavailable when its threads cannot start) and its metric series."""
        if model.batcher is None:
            model.batcher = self._batcher(model)
        await model.batcher.start()
        self.metrics.add_model(model.name, model.manifest.model, model.runtime, model.backend.precision,
                               lambda b=model.batcher: b.depth, lambda b=model.batcher: float(b.ready),
                               model.provenance_labels())

    def serves(self, name: str) -> bool:
        """Whether a version of `name` is served now."""
        return name in self.models

    def unavailable(self) -> list[str]:
        """The models this server knows that serve no version and were not unloaded: the latest load of each failed
        (at start, a runtime not installed here). What Triton's strict readiness counts against the server."""
        return sorted({name for name, _ in self.failures if name not in self.models and name not in self.unloaded})

    def __contains__(self, name: object) -> bool:
        """Whether `name` is a model this server knows: served, served before, or a model directory of its
        repository (what a request's metric label may name: bounded by what exists)."""
        if not isinstance(name, str):
            return False
        if name in self.models or name in self.sources:
            return True
        root = self.settings.model_repository
        return root is not None and bool(NAME_RE.fullmatch(name)) and (root / name).is_dir()

    @contextlib.asynccontextmanager
    async def _turn(self, name: str) -> AsyncIterator[None]:
        """One load or unload of `name` at a time. The lock lives only while someone holds or awaits it, so names
        leave no state behind (the names come from request paths)."""
        turn = self._turns.setdefault(name, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[name]

    async def load(self, name: str) -> ServedModel:
        """(Re)load `name` from its source and swap it in once it is verified and warm; LoadError otherwise."""
        self.source_of(name)  # an unknown name is refused before it is given any state
        async with self._turn(name):
            source = self.source_of(name)
            try:
                version = source.selected()[0]
            except (BundleError, ConfigError, OSError) as exc:
                raise self._failed(name, "", f"model {name!r}: {exc}") from None
            if self._loader is None:  # not started (a repository used without start): as the server would
                self.start_threads()
            # Its errors name the model as the request did: never the command line's NAME=PATH, nor a server path.
            job = self._loader.submit(load_model, source, self.settings, name)
            try:
                model = await asyncio.wrap_future(job)
            except asyncio.CancelledError:  # the request was cancelled (shutdown): a load that ends later is freed
                job.add_done_callback(_close_abandoned)
                raise
            except ServeError as exc:
                raise self._failed(name, version, str(exc)) from None
            except (MemoryError, RuntimeError) as exc:
                if thread_start_failed(exc):  # a thread of the runtime's own (its thread pool), or of Python's
                    raise self._no_threads(name, version, ThreadsUnavailable(f"a thread while loading model {name!r}",
                                                                             exc)) from None
                if not isinstance(exc, MemoryError):
                    raise
                raise self._failed(name, version, f"model {name!r}: out of memory while loading version {version} "
                                                  "(what served before serves on)") from None
            if model.name != name:  # a bundle served under its own name was re-exported under another one
                model = dataclasses.replace(model, name=name)
            try:
                await self._activate(model)
            except BaseException as exc:  # its inference threads could not start: free it; what served serves on
                if model.batcher is not None:
                    model.batcher.discard()
                model.backend.close()
                if isinstance(exc, ThreadsUnavailable):
                    raise self._no_threads(name, model.version, exc) from None
                raise
            old = self.models.get(name)
            self.models[name] = model  # from now on new requests reach the new version
            self.sources[name] = source
            # As an unload, a load that succeeds is the latest news of every version of the model: an earlier failure
            # (of a version since removed, or no longer selected) says nothing of it any more.
            for key in [key for key in self.failures if key[0] == name]:
                del self.failures[key]
            self.unloaded.discard(name)
            log.info("loaded", extra={"model": name, "version": model.version, "bundle": str(model.bundle),
                                      "replaced": old.version if old else None})
            if old is not None:
                self._retire_later(old)
            return model

    def _failed(self, name: str, version: str, reason: str) -> LoadError:
        """Remember and log why a load of a known model failed (what served before serves on): the log line with the
        server's paths, for its operator; the answer and the index with the model's files named within it."""
        public = self._public(name, version, reason)
        # The latest failure last (why_not_served answers with it): a key assigned again keeps its place in a dict.
        self.failures.pop((name, version), None)
        if version:  # the load got past the model's config.pbtxt to a version: its whole-model failure is old news
            self.failures.pop((name, ""), None)
        # With its files as they are now, so that the index can say when they are removed or replaced since.
        self.failures[(name, version)] = Failure(public, self._files_now(name, version))
        if name not in self.models:  # not served: this failure, not an earlier unload, is why
            self.unloaded.discard(name)
            self.metrics.not_served(name)  # a name never served has a readiness series too, at 0
        log.warning("load failed", extra={"model": name, "version": version or None, "reason": reason})
        return LoadError(public)

    def _no_threads(self, name: str, version: str, exc: ThreadsUnavailable) -> ThreadsUnavailable:
        """A load that failed for want of threads: remembered and logged as any failed load, and raised as it is
        (the machine's limit, not the model's fault: 503 + Retry-After, serve.app)."""
        self._failed(name, version, f"cannot start {exc.what} (a thread, pids or memory limit): load it again "
                                    "later (what served before serves on)")
        return exc

    async def unload(self, name: str) -> None:
        """Stop serving `name` once every request admitted to it is answered. As in Triton, a model that is not
        loaded, or a name the server does not know, is left as it is (success); LoadError for a name no model can
        have (NAME_RULE: a path, a traversal), as a load of it is refused."""
        try:
            self.source_of(name)
        except LoadError:
            if not NAME_RE.fullmatch(name):
                raise
            if not any(n == name for n, _ in self.failures):
                return  # Triton's unload of an unknown name unloads nothing and succeeds (idempotent clean-ups)
            # A model whose load failed, and whose directory is gone since: the unload gives it up all the same (else
            # nothing could end its hold on strict readiness but a restart).
        async with self._turn(name):
            model = self.models.pop(name, None)
            # As Triton, an unload is the latest news of every version: a failed load given up on says "unloaded"
            # from now on (and no longer holds strict readiness down).
            failed = [key for key in self.failures if key[0] == name]
            for key in failed:
                del self.failures[key]
            if model is None and not failed:
                return
            self.unloaded.add(name)
            if model is None:
                return
            await self._retire(model)
            log.info("unloaded", extra={"model": name, "version": model.version})

    def _retire_later(self, model: ServedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(model))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, model: ServedModel) -> None:
        """Let every request holding this version finish, then close its batcher and runtime."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.graceful_timeout_s
        while model.users and loop.time() < end:
            await asyncio.sleep(0.01)
        if model.batcher is not None:
            await model.batcher.close(max(0.0, end - loop.time()))
        self.metrics.remove_model(model.name, model.manifest.model, model.runtime, model.backend.precision,
                                  model.provenance_labels())
        model.backend.close()

    def snapshot(self) -> RepositoryView:
        """This repository as it is now, in plain data, for the index to be built from in a thread (serve.routes.v2):
        copies of what loads and unloads go on changing on the event loop meanwhile (sources, failures, unloads), and
        each served model's version and readiness, read here. Read later, in the thread, a reload's retirement of
        the old version (its batcher closed meanwhile) showed a version served all along as not ready."""
        return RepositoryView(self.settings, dict(self.sources), dict(self.failures), set(self.unloaded), {
            name: Serving(m.version, m.batcher is not None and m.batcher.ready) for name, m in self.models.items()})

    async def close(self, timeout: float) -> None:
        """Drain and close every model at once, within one timeout (shutdown)."""
        for task in list(self._retiring):
            task.cancel()
        loaded = list(self.models.values())
        self.models.clear()
        await asyncio.gather(*(m.batcher.close(timeout) for m in loaded if m.batcher is not None))
        close_models({m.name: m for m in loaded})
        # A load still running is not waited for (serve.server exits past it, saying so).
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)


class RepositoryView(_Known):
    """A repository at one moment, in plain data: what its index reads (ModelRepository.snapshot). Building the
    index walks the disk and reads nothing a load or an unload changes."""

    def __init__(self, settings: Settings, sources: dict[str, ModelSource], failures: dict[tuple[str, str], Failure],
                 unloaded: set[str], served: dict[str, Serving]) -> None:
        self.settings, self.sources, self.failures, self.unloaded = settings, sources, failures, unloaded
        self.served = served

    def serves(self, name: str) -> bool:
        """Whether a version of `name` was served at the snapshot."""
        return name in self.served

    def index(self) -> list[dict[str, Any]]:
        """Every model and version the server knows or its repository holds, with its state (READY / UNAVAILABLE)
        and why (Triton lists what is available to load, not only what is loaded)."""
        out = []
        # The names whose last load failed too (listed), their directory gone or not: each holds strict readiness down.
        for name in sorted(set(self.listed()) | set(self.served)):
            served = self.served.get(name)
            try:
                source: ModelSource | None = self._located(name)
                versions = source.versions() if source else []
            except (LoadError, BundleError, OSError):  # unknown, or a directory it cannot read (a load says why)
                source, versions = None, []
            for version in self._listed_versions(name, versions, served):
                ready = served is not None and served.version == version and served.ready
                entry: dict[str, Any] = {"name": name, "version": version, "state": "READY" if ready else "UNAVAILABLE"}
                if not ready:
                    entry["reason"] = self._reason(name, source, version, served)
                out.append(entry)
        return out

    def _listed_versions(self, name: str, on_disk: list[str], served: Serving | None) -> list[str]:
        """The versions of `name` to list: those on disk, and, as Triton lists the state of every version it tried,
        each whose last load failed, its directory removed since or not (its failure is why it is not served)."""
        versions = set(on_disk or ([served.version] if served else []))
        versions |= {v for n, v in self.failures if n == name and v}
        return sorted(versions, key=int) or [""]

    def _reason(self, name: str, source: ModelSource | None, version: str, served: Serving | None) -> str:
        """Why `version` of `name` is not served: its last load's failure (said to be stale when its files were
        removed or replaced since), or why one that never failed is not."""
        if (failed := self.failures.get((name, version))) is not None:
            return self._since(name, version, failed)
        # a load that failed before it chose a version (its config.pbtxt) is why none is served
        if served is None and name not in self.unloaded and (whole := self.failures.get((name, ""))) is not None:
            return whole.reason
        if source is None and (why := self.why_not_served(name)) is not None:  # its directory is gone
            return why
        return self._why_not(name, source, version, served)

    def _since(self, name: str, version: str, failed: Failure) -> str:
        """A failure's reason, and whether the version's files are what failed: a reason about files the version no
        longer holds (a tampered file since re-published) would tell the operator the wrong thing."""
        if not version:
            return failed.reason
        now = self._files_now(name, version)
        if now == failed.files:
            return failed.reason
        if now is None:
            return f"its last load failed: {failed.reason} (its files were removed since)"
        return f"its last load failed: {failed.reason} (its files changed since: load it again)"

    def _why_not(self, name: str, source: ModelSource | None, version: str, served: Serving | None) -> str:
        """Why a version that never failed to load is not served."""
        if source is not None and source.repository and version:
            try:
                if not has_manifest(source.path / version):
                    return f"no {MANIFEST_FILE} in its version directory (empty, or still being copied?)"
            except BundleError as exc:
                return self._public(name, version, str(exc))
        if name in self.unloaded:
            return "unloaded"
        if served is None:
            return "not loaded"
        return "not the version being served" if served.version != version else "not ready"


@dataclasses.dataclass(frozen=True)
class _Place:
    """A directory of the server's, and how an answer names it: `alone` for itself, `within` before a path inside."""

    path: Path
    alone: str
    within: str


# A path is replaced only whole: not inside a longer path or word before it, nor as the start of a longer name after
# it ("/srv/repo" is not "/srv/repo2"), but before a path inside it, a quote, punctuation or the end of the text.
_BEFORE = r"(?<![\w.~/-])"
_AFTER = r"(?:(?P<within>/)|(?=[\s'\",:;)\]]|\.(?!\w)|$))"


def without_places(text: str, places: list[_Place]) -> str:
    """`text` with every spelling of each place's path (as given, absolute, resolved through symbolic links, and as
    repr() escapes it) replaced by how an answer names it; the first place listed wins a spelling two share."""
    spelled: dict[str, _Place] = {}
    for place in places:
        for form in _spellings(place.path):
            spelled.setdefault(form, place)
    if not spelled:
        return text
    # Longest first: a model directory's path wins over its repository's, which starts it. Escaped: a path may hold
    # any character a regular expression gives a meaning to. A one-word relative path ("repo", as --model-repository
    # gave it) is a path only before a '/': alone, it is as likely a word of the message.
    words = [f for f in spelled if os.sep not in f]
    paths = "|".join(re.escape(f) for f in sorted(set(spelled) - set(words), key=len, reverse=True)) or "(?!)"
    starts = "|".join(re.escape(f) for f in sorted(words, key=len, reverse=True)) or "(?!)"

    def named(m: re.Match) -> str:
        place = spelled[m["path"] or m["word"]]
        return place.within if m["within"] or m["word"] else place.alone

    return re.sub(f"{_BEFORE}(?:(?P<path>{paths}){_AFTER}|(?P<word>{starts})/)", named, text)


def _spellings(path: Path) -> set[str]:
    """How a message may spell `path`: as given, absolute, or resolved (a file checked inside a bundle is named by
    its resolved path), each also as repr() escapes it and, where it is not valid UTF-8, with backslash escapes."""
    forms = {str(path), os.path.abspath(path)}
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # a NUL, a loop: the other spellings still count
        forms.add(os.path.realpath(path))
    # A name that is not valid UTF-8 is held as lone surrogates ("\udcff"), which a message cannot print as they are:
    # runtimes.onnxruntime shows such a path's bytes with backslash escapes instead ("\xff").
    forms |= {escaped for f in forms if (escaped := _backslashed(f)) is not None}
    forms |= {repr(f)[1:-1] for f in forms}
    return forms - {os.sep, os.curdir, ""}  # the root directory, or the one the server runs in: no path of a model


def _backslashed(form: str) -> str | None:
    """`form` as the file system's bytes decoded with backslash escapes for what is not UTF-8; None when it cannot
    be encoded (a surrogate that no file name's byte gave)."""
    try:
        return os.fsencode(form).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return None


def _fingerprint(directory: Path) -> tuple | None:
    """A version directory's files as they are now, to tell later whether they are the same: its manifest's hash
    (which names every artifact's sha256: a re-published version is told apart even where a file system reuses an
    inode within its timestamps' resolution), and each file's inode, size, modification and change times (a file
    changed in place); at most MAX_FINGERPRINTED files. None when it is no directory (removed)."""
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            return None
    except (OSError, ValueError):
        return None
    return (_manifest_hash(directory), *sorted(_file_state(directory, p)
                                               for p in _first_entries(directory, MAX_FINGERPRINTED)))


def _first_entries(directory: Path, most: int) -> list[str]:
    """The paths of at most `most` entries under `directory` (symbolic links not followed), listing no directory
    further than that: os.walk lists each directory whole before it yields, 0.1 s for 100,000 files on the event
    loop of a failed load."""
    found: list[str] = []
    pending = [str(directory)]
    while pending and len(found) < most:
        top = pending.pop()
        try:
            with os.scandir(top) as it:
                entries = list(itertools.islice(it, most - len(found)))
        except OSError:
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            found.append(entry.path)
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return found


def _manifest_hash(directory: Path) -> str | None:
    """The sha256 of a version's manifest (as much of it as a load reads); None when it has none it can read."""
    try:  # a regular file only: a FIFO put there is never waited on (the event loop would wait with it)
        return hashlib.sha256(read_regular_file(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES)).hexdigest()
    except (OSError, ValueError):
        return None


def _file_state(directory: Path, path: str) -> tuple[str, int, int, int, int]:
    """(path within `directory`, inode, size, mtime, ctime) of one of its files; -1s when it cannot be looked at."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return os.path.relpath(path, directory), -1, -1, -1, -1
    return os.path.relpath(path, directory), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _some(names: list[str]) -> str:
    """`names` for a reason: the first KNOWN_SAID of them, then how many more (a repository may hold thousands)."""
    if not names:
        return "none"
    more = f" and {len(names) - KNOWN_SAID} more (POST /v2/repository/index lists them)" * (len(names) > KNOWN_SAID)
    return ", ".join(names[:KNOWN_SAID]) + more


def _listed(root: Path | None) -> list[os.DirEntry]:
    """The first MAX_LISTED entries of `root` (none when it is not given or cannot be read)."""
    if root is None:
        return []
    try:
        with os.scandir(root) as it:
            return list(itertools.islice(it, MAX_LISTED))
    except OSError:
        return []


def _close_abandoned(job: Future) -> None:
    """Free the runtime of a load whose request was cancelled before it ended."""
    if not job.cancelled() and job.exception() is None:
        job.result().backend.close()


def _is_file(path: os.PathLike) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _is_dir(path: os.PathLike) -> bool:
    try:
        return os.path.isdir(path)
    except (OSError, ValueError):  # a name too long for the file system
        return False
