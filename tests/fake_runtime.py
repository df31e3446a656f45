"""A runtime that is not a real one (no tests here), plugged in through the registry like any other.

Its artifact is a linear classifier over the per-channel mean of the input, stored as a .npy weight matrix: small
and exact, so route tests can check answers without exporting a model. It records every LoadSpec it is asked to
open, so tests see which options the export's parity gate and the server hand a runtime. In a server process
(`VITC_RUNTIMES=fake_runtime`, tests/ on PYTHONPATH) it can misbehave on purpose, steered by the input's first
value: SLOW (sleeps a second), HANG (blocks while the file $FAKE_RUNTIME_HANG exists); and it appends the first
value of every row it computes to $FAKE_RUNTIME_LOG. With $FAKE_RUNTIME_LOADING set, loading touches that file and
then takes a minute; while the file $FAKE_RUNTIME_LOAD_HANG exists, a load writes "loading" into it and blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from runtimes import LoadSpec, Runtime, Variant
from runtimes.build import Built, ExportContext

WEIGHTS = "fake.npy"
LOADS: list[LoadSpec] = []
SLOW, HANG = 5.0, 7.0  # first input value that makes a row slow, or hang


def weights(channels: int, classes: int, seed: int = 0) -> np.ndarray:
    """(channels + 1, classes) float32: a linear map of the channel means, bias last."""
    return np.random.default_rng(seed).standard_normal((channels + 1, classes)).astype(np.float32)


def logits(w: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """What the fake backend computes, for tests to compare with."""
    return (batch.mean(axis=(2, 3)) @ w[:-1] + w[-1]).astype(np.float32)


def build(ctx: ExportContext, precision: str) -> Built:
    out = ctx.workdir / WEIGHTS
    np.save(out, weights(ctx.meta.config.in_chans, ctx.meta.config.num_classes))
    return Built([out], {"note": "test double"})


class FakeBackend:
    runtime = "fake"

    def __init__(self, spec: LoadSpec) -> None:
        LOADS.append(spec)
        self.parallelism = spec.options.parallel or 2
        self.device, self.precision, self.max_batch = spec.device, spec.precision, spec.max_batch
        self.w = np.load(spec.file(".npy"), allow_pickle=False)
        if loading := os.environ.get("FAKE_RUNTIME_LOADING"):  # a slow load: says it started, then takes its time
            Path(loading).touch()
            time.sleep(60)
        if (hang := os.environ.get("FAKE_RUNTIME_LOAD_HANG")) and Path(hang).exists():
            Path(hang).write_text("loading")
            while Path(hang).exists():
                time.sleep(0.01)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        firsts = batch.reshape(len(batch), -1)[:, 0]
        if log := os.environ.get("FAKE_RUNTIME_LOG"):
            with open(log, "a") as f:
                f.write("".join(f"{v:g}\n" for v in firsts))
        if SLOW in firsts:
            time.sleep(1.0)
        hang = os.environ.get("FAKE_RUNTIME_HANG")
        while HANG in firsts and hang and Path(hang).exists():
            time.sleep(0.01)
        return logits(self.w, batch)

    def describe(self) -> dict[str, Any]:
        return {"inference_precision": "fp32"}

    def close(self) -> None:
        self.w = None


RUNTIME = Runtime(
    name="fake", target="fake", packages=("numpy",), install="(a test double)", format="npy",
    triton_platform="fake_platform", precisions=("fp32",), default_precisions=("fp32",), devices=("cpu",),
    build=build, load=FakeBackend, version=lambda: "0.0", variants=(Variant("fp32"),), tunes=("parallel",),
)


LEGACY = Path(__file__).resolve().parent / "data" / "legacy-bundle-v1"


def server_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `python -m serve` subprocess that loads this runtime; its log and hang switch in tmp_path."""
    repo = Path(__file__).resolve().parents[1]
    return {"VITC_RUNTIMES": "fake_runtime", "PYTHONPATH": f"{repo / 'tests'}:{repo}",
            "FAKE_RUNTIME_LOG": str(tmp_path / "computed.log"), "FAKE_RUNTIME_HANG": str(tmp_path / "hang")}


def request_body(first: float, rows: int = 1) -> bytes:
    """A v2 JSON request of `rows` rows whose first value is `first` (what steers this runtime: SLOW, HANG)."""
    x = np.full((rows, 3, 32, 32), 0.25, np.float32)
    x[:, 0, 0, 0] = first
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def write_bundle(dest: Path) -> Path:
    """A copy of the legacy test bundle with one more servable artifact: the fake runtime's (no export needed)."""
    from models.bundle import Artifact, file_entries, read_manifest, write_manifest

    shutil.copytree(LEGACY, dest)
    m = read_manifest(dest)
    np.save(dest / WEIGHTS, weights(3, len(m.class_names)))
    artifact = Artifact(id="fake-fp32", runtime="fake", format="npy", precision="fp32", servable=True,
                        files=file_entries(dest, [dest / WEIGHTS]))
    write_manifest(dest, dataclasses.replace(m, artifacts=(*m.artifacts, artifact)))
    return dest


@contextlib.contextmanager
def registered() -> Iterator[Runtime]:
    """The fake runtime in the registry for the duration."""
    LOADS.clear()
    runtimes.register(RUNTIME)
    try:
        yield RUNTIME
    finally:
        runtimes.unregister(RUNTIME.name)
