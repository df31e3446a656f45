"""The served models as a live set: load (again), unload and index them while serving (the Open Inference
Protocol repository extension), with a swap that no request notices.

A load reads the model's source again (its bundle, or the newest version of its repository directory), verifies
every file, proves the golden inputs and warms the runtime, all off the event loop, while the old version keeps
serving. Only then does the name point to the new version; the old one is drained (every request that reached it
is answered) and closed. A load that fails leaves the old version serving and answers the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Any

import numpy as np

from models.bundle import BundleError
from serve.batching import DynamicBatcher
from serve.errors import ServeError
from serve.metrics import Metrics
from serve.registry import NAME_RE, ModelSource, ServedModel, close_models, load_model
from serve.settings import Settings
from serve.stats import Observers

log = logging.getLogger("vitc.serve")
MAX_LISTED = 4096  # directory entries of a repository looked at for its index


class LoadError(Exception):
    """A model could not be loaded (or unloaded): the reason, in one line; what served before still serves."""


class ModelRepository:
    """The models one server serves, by name; `models` is the dict the routes read."""

    def __init__(self, settings: Settings, metrics: Metrics, models: dict[str, ServedModel]) -> None:
        self.settings, self.metrics, self.models = settings, metrics, models
        self.sources: dict[str, ModelSource] = {m.name: m.source or ModelSource(m.bundle, m.name)
                                                for m in models.values()}
        self.failures: dict[tuple[str, str], str] = {}  # (name, version) -> why its last load failed
        self.unloaded: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start a batcher for every model loaded before the server bound its port."""
        for model in self.models.values():
            await self._activate(model)

    async def _activate(self, model: ServedModel) -> None:
        s = self.settings
        model.batcher = DynamicBatcher(
            model.name, model.backend.infer, max_batch=model.max_batch,
            max_delay_s=(s.max_queue_delay_ms if model.queue_delay_ms is None else model.queue_delay_ms) / 1000,
            max_queue=s.max_queue_size, parallel=s.parallel or model.backend.parallelism,
            observer=Observers(self.metrics, model.stats), timeout_s=s.inference_timeout_s,
            probe=np.zeros((1, *model.sample_shape), np.float32),
        )
        await model.batcher.start()
        self.metrics.add_model(model.name, model.manifest.model, model.backend.runtime, model.backend.precision,
                               lambda b=model.batcher: b.depth, model.provenance_labels())

    def source_of(self, name: str) -> ModelSource:
        """Where `name` loads from: the source it was served from, or a directory of --model-repository."""
        if name in self.sources:
            return self.sources[name]
        root = self.settings.model_repository
        if root is not None and NAME_RE.match(name) and (root / name).is_dir():
            return ModelSource(root / name, name, repository=True)
        raise LoadError(f"no model {name!r} in the repository; known: {', '.join(sorted(self.sources)) or 'none'}")

    async def load(self, name: str) -> ServedModel:
        """(Re)load `name` from its source and swap it in once it is verified and warm; LoadError otherwise."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            source = self.source_of(name)
            try:
                version = source.newest()[0]
            except (BundleError, OSError) as exc:
                self.failures[(name, "")] = f"model {name!r}: {exc}"
                raise LoadError(self.failures[(name, "")]) from None
            try:
                model = await asyncio.get_running_loop().run_in_executor(None, load_model, source, self.settings)
            except ServeError as exc:
                self.failures[(name, version)] = str(exc)
                raise LoadError(str(exc)) from None
            if model.name != name:  # a bundle served under its own name was re-exported under another one
                model = ServedModel(name, model.bundle, model.manifest, model.backend, model.max_batch,
                                    model.version, source, model.queue_delay_ms)
            await self._activate(model)
            old = self.models.get(name)
            self.models[name] = model  # from now on new requests reach the new version
            self.sources[name] = source
            self.failures.pop((name, model.version), None)
            self.failures.pop((name, ""), None)
            self.unloaded.discard(name)
            log.info("loaded", extra={"model": name, "version": model.version, "bundle": str(model.bundle),
                                      "replaced": old.version if old else None})
            if old is not None:
                self._retire_later(old)
            return model

    async def unload(self, name: str) -> None:
        """Stop serving `name` once every request that reached it is answered; LoadError when it is not served."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.models.pop(name, None)
            if model is None:
                raise LoadError(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            await self._retire(model)

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
        self.metrics.remove_model(model.name, model.manifest.model, model.backend.runtime, model.backend.precision,
                                  model.provenance_labels())
        model.backend.close()

    def _on_disk(self) -> list[str]:
        """The model directories of --model-repository, loaded or not (at most MAX_LISTED are looked at)."""
        root = self.settings.model_repository
        if root is None:
            return []
        try:
            with os.scandir(root) as it:
                entries = list(itertools.islice(it, MAX_LISTED))
        except OSError:
            return []
        return [e.name for e in entries if NAME_RE.match(e.name) and e.is_dir()]

    def index(self) -> list[dict[str, Any]]:
        """Every model and version the server knows or its repository holds, with its state (READY / UNAVAILABLE)
        and why (Triton lists what is available to load, not only what is loaded)."""
        out = []
        for name in sorted(set(self.sources) | set(self.models) | set(self._on_disk())):
            loaded = self.models.get(name)
            try:
                versions = self.source_of(name).versions()
            except (LoadError, OSError):
                versions = []
            for version in versions or ([loaded.version] if loaded else [""]):
                ready = loaded is not None and loaded.version == version and loaded.batcher is not None \
                    and loaded.batcher.ready
                entry: dict[str, Any] = {"name": name, "version": version, "state": "READY" if ready else "UNAVAILABLE"}
                if not ready:
                    entry["reason"] = (self.failures.get((name, version)) or
                                       ("unloaded" if name in self.unloaded else
                                        "not loaded" if loaded is None else
                                        "not the version being served" if loaded.version != version else "not ready"))
                out.append(entry)
        return out

    async def close(self, timeout: float) -> None:
        """Drain and close every model at once, within one timeout (shutdown)."""
        for task in list(self._retiring):
            task.cancel()
        loaded = list(self.models.values())
        self.models.clear()
        await asyncio.gather(*(m.batcher.close(timeout) for m in loaded if m.batcher is not None))
        close_models({m.name: m for m in loaded})
