"""A runtime added from outside is held to the Backend contract where it serves: the server knows a model's runtime
by the Runtime it loaded it with (not the backend's `runtime` attribute), the loader refuses a Backend whose
attributes break the contract in one line (export refuses the artifact, `python -m serve` exits 2), and every
inference's output must be (rows, classes) floats, else that batch fails with a 500 that says what came back.

This module is also a plugin (`VITC_RUNTIMES=test_runtime_contract_serving`): its RUNTIME has parallelism 0."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_runtime
import numpy as np
import pytest

import runtimes
from runtimes import BackendError, LoadSpec, Runtime

REPO = Path(__file__).resolve().parents[1]
MODE: dict[str, str] = {"out": ""}  # how MisbehavingBackend answers from now on (set by a test once it serves)


def _misbehave(y: np.ndarray) -> Any:
    """The fake runtime's logits as MODE says to return them."""
    return {
        "": lambda: y,
        "wide": lambda: np.concatenate([y, y[:, :1]], axis=1),
        "argmax": lambda: y.argmax(1),
        "3d": lambda: y[:, :, None],
        "object": lambda: y.astype(object),
        "list": lambda: y.tolist(),
        "none": lambda: None,
        "extra row": lambda: np.concatenate([y, y[:1]]),
        "float64": lambda: y.astype(np.float64),
        "nan": lambda: np.full_like(y, np.nan),
        "masked": lambda: np.ma.masked_array(y, mask=np.arange(y.size).reshape(y.shape) % 3 == 0),
        "matrix": lambda: np.asmatrix(y),
    }[MODE["out"]]()


class MisbehavingBackend(fake_runtime.FakeBackend):
    """The fake runtime's backend, subclassed as a user writes a variant of a built-in one: its `runtime` attribute
    stays the parent's "fake"."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return _misbehave(super().infer(batch))


class TypoBackend(fake_runtime.FakeBackend):
    runtime = "TypoRT"  # names no registered runtime


class NoRuntimeBackend:
    """A complete Backend but for the (informational) `runtime` attribute."""

    def __init__(self, spec: LoadSpec) -> None:
        self._inner = fake_runtime.FakeBackend(spec)
        self.precision, self.device = self._inner.precision, self._inner.device
        self.max_batch, self.parallelism = self._inner.max_batch, 1

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._inner.infer(batch)

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self._inner.close()


def _with(**attrs: Any) -> type:
    """A fake backend whose instances have `attrs` set after loading (None: the attribute removed)."""

    class Broken(fake_runtime.FakeBackend):
        def __init__(self, spec: LoadSpec) -> None:
            super().__init__(spec)
            for name, value in attrs.items():
                setattr(self, name, value)

        def __getattribute__(self, name: str) -> Any:
            if name in attrs and attrs[name] is None:
                raise AttributeError(name)
            return super().__getattribute__(name)

    return Broken


def _runtime(name: str, load: Any) -> Runtime:
    return dataclasses.replace(fake_runtime.RUNTIME, name=name, target=name, load=load,
                               triton_platform=f"{name}_platform", triton_backend=f"{name}_backend",
                               tunes=("threads",))


RUNTIME = _runtime("contract_par0", _with(parallelism=0))  # what a `python -m serve` subprocess plugs in


@contextlib.contextmanager
def registered(*rts: Runtime) -> Iterator[None]:
    for rt in rts:
        runtimes.register(rt)
    try:
        yield
    finally:
        for rt in rts:
            runtimes.unregister(rt.name)


def _bundle(dest: Path, runtime: str) -> Path:
    """The fake runtime's test bundle with its artifact relabelled as `runtime`'s."""
    from models.bundle import read_manifest, write_manifest

    fake_runtime.write_bundle(dest)
    m = read_manifest(dest)
    arts = tuple(dataclasses.replace(a, id=f"{runtime}-fp32", runtime=runtime) if a.runtime == "fake" else a
                 for a in m.artifacts)
    write_manifest(dest, dataclasses.replace(m, artifacts=arts))
    return dest


@contextlib.contextmanager
def serving(bundle: Path, backend: str) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    MODE["out"] = ""
    try:
        with TestClient(create_app(Settings(models=[f"m={bundle}"], backend=backend, access_log=False))) as client:
            yield client
    finally:
        MODE["out"] = ""


def _v2(rows: int) -> bytes:
    x = np.full((rows, 3, 32, 32), 0.25, np.float32)
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def _png() -> bytes:
    from test_serve_fixtures import animal_pngs

    return animal_pngs(1)[0]


# -- which runtime a model runs on: the one that loaded it -------------------------------------------------------------

def test_a_backend_subclassing_another_runtime_s_reports_its_own_runtime(tmp_path):
    contract = _runtime("contract", MisbehavingBackend)
    with registered(fake_runtime.RUNTIME, contract), serving(_bundle(tmp_path / "b", "contract"), "contract") as c:
        assert c.get("/v2/models/m").json()["platform"] == "contract_platform"  # not the parent's fake_platform
        config = c.get("/v2/models/m/config").json()
        assert (config["platform"], config["backend"]) == ("contract_platform", "contract_backend")
        assert c.get("/v1/models/m").json()["runtime"] == "contract"
        info = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("vitc_model_info{")]
        assert len(info) == 1 and 'runtime="contract"' in info[0]


@pytest.mark.parametrize("backend", [TypoBackend, NoRuntimeBackend], ids=["typo", "missing"])
def test_a_wrong_or_missing_runtime_attribute_changes_nothing(tmp_path, backend):
    with registered(_runtime("contract", backend)), serving(_bundle(tmp_path / "b", "contract"), "contract") as c:
        for path in ("/v2/models/m", "/v2/models/m/config"):
            r = c.get(path)
            assert r.status_code == 200 and r.json()["platform"] == "contract_platform", r.text
        assert c.get("/v1/models/m").json()["runtime"] == "contract"
        assert c.post("/v2/models/m/infer", content=_v2(1)).status_code == 200


# -- what infer returns: checked on every batch ---------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "v1", "v2"), [
    ("wide", "shape (1, 11)", "shape (2, 11)"),
    ("argmax", "int64 of shape (1,)", "int64 of shape (2,)"),
    ("3d", "shape (1, 10, 1)", "shape (2, 10, 1)"),
    ("object", "object of shape (1, 10)", "object of shape (2, 10)"),
    ("list", "list", "list"),
    ("none", "NoneType", "NoneType"),
    ("extra row", "shape (2, 10)", "shape (3, 10)"),
])
def test_an_output_that_breaks_the_contract_fails_its_batch_with_what_came_back(tmp_path, mode, v1, v2):
    contract = _runtime("contract", MisbehavingBackend)
    with registered(contract), serving(_bundle(tmp_path / "b", "contract"), "contract") as c:
        MODE["out"] = mode
        array = "a numpy array of shape " if mode in ("list", "none") else ""
        r = c.post("/v1/models/m/classify", content=_png(), headers={"content-type": "image/png"})
        assert (r.status_code, r.json()) == (500, {"error": f"backend returned {v1}, expected {array}(1, 10) float32"})
        r = c.post("/v2/models/m/infer", content=_v2(2))
        assert (r.status_code, r.json()) == (500, {"error": f"backend returned {v2}, expected {array}(2, 10) float32"})
        MODE["out"] = ""  # the model itself is fine again: the failure was that batch's alone
        assert c.post("/v2/models/m/infer", content=_v2(2)).status_code == 200


def test_another_float_dtype_is_served_as_float32_and_non_finite_outputs_stay_422(tmp_path):
    with registered(_runtime("contract", MisbehavingBackend)), \
            serving(_bundle(tmp_path / "b", "contract"), "contract") as c:
        want = c.post("/v2/models/m/infer", content=_v2(2)).json()["outputs"][0]
        MODE["out"] = "float64"
        got = c.post("/v2/models/m/infer", content=_v2(2)).json()["outputs"][0]
        assert (got["datatype"], got["shape"]) == ("FP32", [2, 10]) and got["data"] == want["data"]
        MODE["out"] = "nan"
        r = c.post("/v2/models/m/infer", content=_v2(1))
        assert r.status_code == 422 and "non-finite outputs" in r.json()["error"]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_masked_array_fails_its_batch_and_a_matrix_is_served_as_the_plain_array(tmp_path):
    """A masked array was a v2 200 with null in its FP32 data (v1: a 500 'internal error'); np.matrix was nested v2
    JSON data (v1: an IndexError)."""
    contract = _runtime("contract", MisbehavingBackend)
    with registered(contract), serving(_bundle(tmp_path / "b", "contract"), "contract") as c:
        png = {"content": _png(), "headers": {"content-type": "image/png"}}
        plain_v1 = c.post("/v1/models/m/classify", **png).json()
        plain_v2 = c.post("/v2/models/m/infer", content=_v2(2)).json()
        MODE["out"] = "masked"
        why = "backend returned a masked array (numpy.ma.MaskedArray), expected a plain numpy array of shape"
        r = c.post("/v1/models/m/classify", **png)
        assert (r.status_code, r.json()) == (500, {"error": f"{why} (1, 10) float32"})
        r = c.post("/v2/models/m/infer", content=_v2(2))
        assert (r.status_code, r.json()) == (500, {"error": f"{why} (2, 10) float32"})
        MODE["out"] = "matrix"
        r = c.post("/v1/models/m/classify", **png)
        assert (r.status_code, r.json()) == (200, plain_v1)
        r = c.post("/v2/models/m/infer", content=_v2(2))
        assert (r.status_code, r.json()) == (200, plain_v2)
        assert len(r.json()["outputs"][0]["data"]) == 20  # flat, as FP32 data is


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_the_gate_judges_the_array_the_server_sends(tmp_path, micro_checkpoint):
    """The export certified both: its gate judged np.asarray of the output, the mask dropped."""

    from export.bundle import build_bundle
    from runtimes.loader import golden_outputs

    MODE["out"] = "masked"
    try:
        with registered(rt := _runtime("contract_masked", MisbehavingBackend)):
            m = build_bundle(micro_checkpoint(tmp_path), tmp_path / "out", [rt.target], max_batch=4, parity_samples=16,
                             threads=1, log=lambda _: None)
        artifact = m.artifacts[-1]
        assert artifact.id == "contract_masked-fp32" and not artifact.servable
        assert "backend returned a masked array (numpy.ma.MaskedArray)" in artifact.refused_reason
        # The golden check (export's, and every load's) judges each batch as the server does, not np.asarray's view.
        backend = MisbehavingBackend(LoadSpec(*_spec_parts(fake_runtime.write_bundle(tmp_path / "fb"))))
        x = np.full((3, 3, 32, 32), 0.25, np.float32)
        with pytest.raises(BackendError, match=r"^backend returned a masked array \(numpy.ma.MaskedArray\)"):
            golden_outputs(backend, x, 2)
        MODE["out"] = "matrix"  # the same numbers as the plain array, which the server now sends
        matrix = golden_outputs(backend, x, 2)
        MODE["out"] = ""
        assert type(matrix) is np.ndarray and np.array_equal(matrix, golden_outputs(backend, x, 2))
    finally:
        MODE["out"] = ""


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_the_batcher_checks_rows_and_columns_and_casts_other_floats(tmp_path):
    from runtimes.base import check_logits

    y = np.zeros((2, 10), np.float16)
    assert check_logits(y, 2, 10).dtype == np.float32
    assert check_logits(np.zeros(3), 3, None).shape == (3,)  # no width known: the rows alone
    with pytest.raises(BackendError, match=r"^backend returned shape \(3,\) for a batch of 2$"):
        check_logits(np.zeros(3), 2, None)
    with pytest.raises(BackendError, match=r"^backend returned bool of shape \(2, 10\), expected \(2, 10\) float32$"):
        check_logits(y.astype(bool), 2, 10)
    # Subclasses: viewed as the plain ndarray the routes index and serialise, or refused (a masked array).
    for sub in (np.asmatrix(y), y.view(np.recarray), np.memmap(tmp_path / "y", np.float64, "w+", shape=(2, 10))):
        got = check_logits(sub, 2, 10)
        assert type(got) is np.ndarray and got.dtype == np.float32 and got.shape == (2, 10)
    assert type(check_logits(np.asmatrix(y), 2, None)) is np.ndarray
    for classes, want in ((10, "of shape (2, 10) float32"), (None, "of 2 rows")):
        with pytest.raises(BackendError, match=re.escape(f"backend returned a masked array (numpy.ma.MaskedArray), "
                                                         f"expected a plain numpy array {want}")):
            check_logits(np.ma.masked_array(y), 2, classes)


# -- what load returns: checked once ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("attrs", "why"), [
    ({"parallelism": 0}, "parallelism must be a whole number in 1..4096, got 0"),
    ({"max_batch": "4"}, "max_batch must be a whole number in 1..1024, got '4'"),
    # More rows than any bundle, the export or the server batch (models.bundle.MAX_BATCH_LIMIT): the bound is said.
    ({"max_batch": 1 << 16}, "max_batch must be a whole number in 1..1024, got 65536"),
    ({"max_batch": np.float64(8)}, f"max_batch must be a whole number in 1..1024, got {np.float64(8)!r}"),
    ({"parallelism": True}, "parallelism must be a whole number in 1..4096, got True"),
    ({"precision": None, "device": ""}, "no precision; device must be a non-empty string, got ''"),
    ({"close": None, "describe": 1}, "no describe(); no close()"),
])
def test_a_backend_whose_attributes_break_the_contract_is_refused_at_load(tmp_path, attrs, why):
    from serve.errors import ServeError

    with registered(_runtime("contract", _with(**attrs))), pytest.raises(ServeError) as err, \
            serving(_bundle(tmp_path / "b", "contract"), "contract"):
        pass
    text = str(err.value)
    assert "\n" not in text and text.endswith(f"contract cannot load 'contract-fp32' from {tmp_path / 'b'}: its "
                                              f"Backend (Broken) breaks the contract: {why}"), text


class ReadOnlyCounts:
    """A Backend whose counts are numpy integers from read-only properties."""

    precision, device = "fp32", "cpu"
    max_batch = property(lambda self: np.int64(8))
    parallelism = property(lambda self: np.int64(1))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), 10), np.float32)

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def test_numpy_integer_counts_are_whole_numbers_and_served_as_ints(tmp_path):
    """np.int64(8) was refused as not 'a whole number'; stored as it came, it would reach JSON answers."""
    from runtimes.base import check_backend

    attrs = {"max_batch": np.int64(4), "parallelism": np.int32(2)}
    with registered(_runtime("contract", _with(**attrs))), serving(_bundle(tmp_path / "b", "contract"),
                                                                   "contract") as c:
        r = c.get("/v1/models/m")
        assert r.status_code == 200 and r.json()["max_batch"] == 4, r.text
        assert c.get("/v2/models/m/config").status_code == 200
        assert c.post("/v2/models/m/infer", content=_v2(4)).status_code == 200
        backend = c.app.state.models["m"].backend
        assert (type(backend.max_batch), type(backend.parallelism)) == (int, int)
    with pytest.raises(BackendError, match=re.escape(
            f"its Backend (ReadOnlyCounts) breaks the contract: max_batch must be an int, got {np.int64(8)!r}, which "
            f"cannot be stored back as one; parallelism must be an int, got {np.int64(1)!r}, which cannot be stored "
            "back as one")):
        check_backend(ReadOnlyCounts())


def _spec_parts(bundle: Path) -> tuple[Any, Any, tuple[Path, ...]]:
    from models.bundle import read_manifest

    m = read_manifest(bundle)
    artifact = m.artifacts[-1]
    return m, artifact, (bundle / fake_runtime.WEIGHTS,)


def test_export_refuses_an_artifact_whose_backend_breaks_the_contract(tmp_path, micro_checkpoint):

    from export.bundle import build_bundle

    with registered(RUNTIME):
        m = build_bundle(micro_checkpoint(tmp_path), tmp_path / "out", ["contract_par0"], max_batch=4,
                         parity_samples=16, threads=1, log=lambda _: None)
    artifact = m.artifacts[-1]
    assert artifact.id == "contract_par0-fp32" and not artifact.servable
    assert artifact.refused_reason == ("export failed: BackendError: contract_par0 cannot load 'contract_par0-fp32': "
                                       "its Backend (Broken) breaks the contract: parallelism must be a whole number "
                                       "in 1..4096, got 0")


def test_the_server_refuses_it_with_one_line_and_exit_2(tmp_path):
    bundle = _bundle(tmp_path / "b", "contract_par0")
    env = {**{k: v for k, v in os.environ.items() if not k.upper().startswith("VITC_")},
           "VITC_RUNTIMES": "test_runtime_contract_serving", "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    r = subprocess.run([sys.executable, "-m", "serve", "--model", str(bundle), "--backend", "contract_par0",
                        "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m serve: error: model ") and lines[0].endswith(
        "its Backend (Broken) breaks the contract: parallelism must be a whole number in 1..4096, got 0"), r.stderr
    shutil.rmtree(bundle)
