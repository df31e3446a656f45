"""A runtime plugin's faults (tests/plugin_faults_rt.py) each end in one line naming the runtime and the artifact:
a build that returns files that are not new files of its own refuses its artifact and leaves no earlier artifact
corrupt; an infer or describe that raises while the artifact loads is a BackendError (export refuses the artifact,
`python -m serve` exits 2, a hot reload answers 400); describe() must be JSON data (numpy scalars converted); and
the load-time check of the golden inputs' logits is the request-time one."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import plugin_faults_rt
import pytest

import runtimes
from models.bundle import read_manifest, verify_files
from runtimes import BackendError, LoadSpec

REPO = Path(__file__).resolve().parents[1]
RT = plugin_faults_rt.RUNTIME
ID = "faultrt-fp32"
MAX_BATCH = 4  # the bundles' max batch: the golden inputs run in batches of 4


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    runtimes.register(RT)
    try:
        yield
    finally:
        runtimes.unregister(RT.name)


@pytest.fixture
def fault(monkeypatch, registered) -> Iterator[Callable[[str], None]]:
    """`fault(mode)`: the plugin misbehaves that way from now on (until the test ends)."""
    monkeypatch.delenv("PLUGIN_FAULT_FILE", raising=False)
    monkeypatch.setenv("PLUGIN_FAULT", "")
    yield lambda mode: monkeypatch.setenv("PLUGIN_FAULT", mode)


def _export(checkpoint: Path, out: Path, targets: list[str], log: list[str] | None = None):
    from export.bundle import build_bundle

    return build_bundle(checkpoint, out, targets, max_batch=MAX_BATCH, parity_samples=16, threads=1,
                        log=(log.append if log is not None else lambda _: None))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, micro_checkpoint, registered) -> Path:
    """A bundle whose faultrt-fp32 artifact passed its gate (the plugin behaving): golden inputs included."""
    where = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PLUGIN_FAULT", raising=False)
        mp.delenv("PLUGIN_FAULT_FILE", raising=False)
        m = _export(micro_checkpoint(where), where / "b", [RT.target])
    assert m.golden is not None and [a.id for a in m.servable()] == ["torch-fp32", ID]
    return where / "b"


def _sound(out: Path) -> None:
    """The bundle is what its own report and a server accept: every servable artifact's files as listed, the
    golden file and records intact, and nothing in it that the manifest does not list."""
    from export.bundle import _foreign_entry, _own_files
    from export.report import integrity

    m = read_manifest(out)
    assert integrity(out, m) == {}
    for a in m.servable():
        verify_files(out, a)
    assert _foreign_entry(out, _own_files(m)) is None
    assert not (out / ".scratch").exists()


# --- 1. a build may only return new files it wrote into the bundle, outside .scratch --------------------------------

RULE = "(a build may only return new files it wrote into the bundle directory, outside .scratch)"


@pytest.mark.parametrize(("mode", "why"), [
    ("scratch", "faultrt build returned '.scratch/hub.onnx', which lies in the export's .scratch directory, deleted "
                "before the bundle is written"),
    ("dup", "faultrt build returned 'faultrt.onnx' twice"),
    ("outside", "faultrt build returned '{out}faultrt.onnx', which lies outside the bundle"),
])
def test_a_build_returning_files_that_are_not_its_own_new_files_is_refused(fault, micro_checkpoint, tmp_path, mode,
                                                                           why):
    """.scratch/hub.onnx was certified and then deleted with .scratch (the report: CORRUPT, the server refused the
    bundle); a file listed twice was certified twice (its size counted twice)."""
    fault(mode)
    lines: list[str] = []
    m = _export(micro_checkpoint(tmp_path), tmp_path / "b", [RT.target], lines)
    art = next(a for a in m.artifacts if a.id == ID)
    assert not art.servable and art.refused_reason == f"{why} {RULE}".replace("{out}", str(tmp_path) + "/")
    assert not art.refused_files  # what it listed is not its own: not recorded as its files
    assert any(ln.startswith(ID) and "REFUSED" in ln for ln in lines), lines
    _sound(tmp_path / "b")


def test_a_build_returning_another_artifacts_file_leaves_no_artifact_corrupt(fault, micro_checkpoint, tmp_path):
    """The reported case: the plugin wrote and returned model.onnx after onnx-fp32 had passed its gate; its own
    artifact was refused, the cleanup removed new names only, and the export exited 0 with onnx-fp32 CORRUPT."""
    fault("collide")
    lines: list[str] = []
    m = _export(micro_checkpoint(tmp_path), tmp_path / "b", ["onnx", RT.target], lines)
    arts = {a.id: a for a in m.artifacts}
    assert arts[ID].refused_reason == f"faultrt build returned 'model.onnx', a file of 'onnx-fp32' built before it " \
                                      f"{RULE}"
    # onnx-fp32's file was changed after its gate: refused (with the reason), never shipped corrupt
    assert not arts["onnx-fp32"].servable
    assert arts["onnx-fp32"].refused_reason == ("its file 'model.onnx' was changed after its gate, by the build or "
                                                f"load of {ID}")
    assert [a.id for a in m.servable()] == ["torch-fp32"]
    assert any(ln.startswith("onnx-fp32") and "REFUSED: its file 'model.onnx' was changed" in ln for ln in lines)
    _sound(tmp_path / "b")


def test_a_build_that_rewrites_a_file_it_does_not_list_is_refused_with_its_victim(fault, micro_checkpoint, tmp_path):
    fault("overwrite")
    m = _export(micro_checkpoint(tmp_path), tmp_path / "b", ["onnx", RT.target])
    arts = {a.id: a for a in m.artifacts}
    assert arts[ID].refused_reason == ("its build or load changed 'model.onnx' of 'onnx-fp32', built before it (a "
                                       "build may only write new files)")
    assert not arts["onnx-fp32"].servable and [a.id for a in m.servable()] == ["torch-fp32"]
    _sound(tmp_path / "b")


def test_a_bundle_is_not_replaced_by_one_whose_artifact_another_build_spoiled(fault, micro_checkpoint, tmp_path):
    """An old bundle serving onnx-fp32 stays: the new export refused onnx-fp32, so it may not replace it."""
    from export.bundle import ExportError

    ckpt = micro_checkpoint(tmp_path)
    _export(ckpt, tmp_path / "b", ["onnx"])
    before = read_manifest(tmp_path / "b")
    fault("overwrite")
    with pytest.raises(ExportError, match="holds servable artifacts this export refused: onnx-fp32 \\(its file "
                                          "'model.onnx' was changed after its gate"):
        _export(ckpt, tmp_path / "b", ["onnx", RT.target])
    assert read_manifest(tmp_path / "b") == before
    _sound(tmp_path / "b")


def test_a_behaving_plugin_beside_the_builtins_is_still_certified(fault, micro_checkpoint, tmp_path):
    m = _export(micro_checkpoint(tmp_path), tmp_path / "b", ["onnx", RT.target])
    assert [a.id for a in m.servable()] == ["torch-fp32", "onnx-fp32", ID]
    assert next(a for a in m.artifacts if a.id == ID).files[0].path == "faultrt.onnx"
    _sound(tmp_path / "b")


# --- 2 and 4. faults while an artifact loads: one BackendError line naming the runtime and the artifact -------------

def _opened(bundle: Path) -> None:
    runtimes.open_backend(bundle, read_manifest(bundle), RT.name).close()


@pytest.mark.parametrize(("mode", "why"), [
    ("raise", "golden inputs: faultrt inference failed: plugin kernel failed"),
    # int32 logits passed the load's dtype check and were refused as numbers that "differ from its own at export"
    ("int", f"golden inputs: backend returned int32 of shape ({MAX_BATCH}, 10), expected ({MAX_BATCH}, 10) float32"),
    ("rows", f"golden inputs: backend returned shape (1, 10), expected ({MAX_BATCH}, 10) float32"),
    ("describe_raise", "faultrt describe() failed: ValueError: describe broke"),
    ("describe_none", "faultrt describe() returned NoneType, expected a dict"),
    ("describe_set", "faultrt describe() returned set at providers, not a JSON value (a string, number, bool, None, "
                     "list or dict of them)"),
])
def test_a_fault_while_the_artifact_loads_is_one_backend_error_naming_runtime_and_artifact(fault, bundle, mode, why):
    fault(mode)
    with pytest.raises(BackendError) as err:
        _opened(bundle)
    assert str(err.value) == f"faultrt cannot load {ID!r} from {bundle}: {why}"


@pytest.mark.parametrize(("mode", "why"), [
    ("raise", "warm-up on one image: faultrt inference failed: plugin kernel failed"),
    ("int", "warm-up on one image: backend returned int32 of shape (1, 10), expected (1, 10) float32"),
])
def test_a_fault_in_the_warm_up_is_one_backend_error_too(fault, bundle, mode, why):
    """The warm-up runs where there are no golden inputs (export's gate opens every artifact that way)."""
    from runtimes.loader import open_artifact

    m = read_manifest(bundle)
    artifact = m.select(RT.name)
    spec = LoadSpec(dataclasses.replace(m, golden=None), artifact, (bundle / artifact.files[0].path,))
    fault(mode)
    with pytest.raises(BackendError) as err:
        open_artifact(RT, spec, where="here")
    assert str(err.value) == f"faultrt cannot load {ID!r} from here: {why}"


def test_a_plugin_whose_infer_raises_is_refused_by_export_in_one_line(fault, micro_checkpoint, tmp_path):
    fault("raise")
    m = _export(micro_checkpoint(tmp_path), tmp_path / "b", [RT.target])
    art = next(a for a in m.artifacts if a.id == ID)
    assert not art.servable and "plugin kernel failed" in art.refused_reason and "\n" not in art.refused_reason
    _sound(tmp_path / "b")


def _serve_env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VITC_", "PLUGIN_FAULT"))}
    return {**env, "VITC_RUNTIMES": "plugin_faults_rt", "PLUGIN_FAULT": mode,
            "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}


@pytest.mark.parametrize(("mode", "why"), [
    ("raise", "golden inputs: faultrt inference failed: plugin kernel failed"),
    ("describe_raise", "faultrt describe() failed: ValueError: describe broke"),
])
def test_serve_does_not_start_with_a_plugin_that_raises_at_load_and_says_why_in_one_line(bundle, tmp_path, mode, why):
    """It crashed with a traceback (exit 1)."""
    r = subprocess.run([sys.executable, "-m", "serve", "--model", f"m={bundle}", "--backend", RT.name, "--port",
                        "20911"], cwd=tmp_path, env=_serve_env(mode), capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert lines[0].endswith(f"model 'm={bundle}': faultrt cannot load {ID!r} from {bundle}: {why}"), lines[0]


@pytest.fixture
def client(bundle, tmp_path, fault, monkeypatch) -> Iterator[tuple[object, Path]]:
    """A server of the bundle on the plugin (in this process), and the file that switches its fault."""
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    switch = tmp_path / "fault"
    monkeypatch.setenv("PLUGIN_FAULT_FILE", str(switch))
    settings = Settings(model_control_mode="explicit", models=[f"m={bundle}"], backend=RT.name, access_log=False)
    with TestClient(create_app(settings)) as c:
        yield c, switch


def _png() -> bytes:
    from test_serve_fixtures import animal_pngs

    return animal_pngs(1)[0]


def test_a_hot_reload_of_a_plugin_that_raises_answers_400_and_the_request_500_is_one_line(client):
    """The reload answered 500 "internal error (ValueError)", the request's 500 carried the second line too."""
    c, switch = client
    png = {"content": _png(), "headers": {"content-type": "image/png"}}
    assert c.post("/v1/models/m/classify", **png).status_code == 200
    switch.write_text("raise")
    r = c.post("/v2/repository/models/m/load")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith(f"model 'm': faultrt cannot load {ID!r} from ") and "\n" not in error, error
    assert error.endswith(": golden inputs: faultrt inference failed: plugin kernel failed"), error
    r = c.post("/v1/models/m/classify", **png)  # the version loaded before still serves, and fails this batch
    assert (r.status_code, r.json()) == (500, {"error": "inference failed: ValueError: plugin kernel failed"})
    switch.write_text("")
    assert c.post("/v2/repository/models/m/load").status_code == 200
    assert c.post("/v1/models/m/classify", **png).status_code == 200


# --- 3. describe(): JSON data, numpy scalars converted --------------------------------------------------------------

def test_numpy_scalars_in_describe_are_served_as_json_numbers(fault, client):
    """GET /v1/models and /v1/models/{name} answered 500 for good (PydanticSerializationError)."""
    c, switch = client  # started behaving; the description is read when the model loads
    switch.write_text("describe_numpy")
    assert c.post("/v2/repository/models/m/load").status_code == 200
    want = {"threads": 2, "scale": 0.5, "fast": True}
    r = c.get("/v1/models/m")
    assert r.status_code == 200 and r.json()["execution"] == want, r.text
    r = c.get("/v1/models")
    assert r.status_code == 200, r.text


def test_description_converts_numpy_scalars_and_refuses_what_json_cannot_hold():
    from runtimes.base import description

    class Describes:
        def __init__(self, value: object) -> None:
            self.value = value

        def describe(self) -> object:
            return self.value

    got = description(Describes({"a": np.int64(3), "b": [np.float32(0.25), np.bool_(False)], "c": {1: "x"},
                                 "d": np.str_("s"), "e": None}), "myrt")
    assert got == {"a": 3, "b": [0.25, False], "c": {"1": "x"}, "d": "s", "e": None}
    assert [type(v) for v in (got["a"], got["b"][0], got["b"][1], got["d"])] == [int, float, bool, str]
    for value, why in [
        (None, "returned NoneType, expected a dict"),
        ({"x": float("nan")}, "returned nan at x, not a finite number"),
        ({"x": np.zeros(2)}, "returned ndarray at x, not a JSON value"),
        ({(1, 2): 1}, "returned key (1, 2) (tuple) at the top, not a string"),
        ({"x": [{"y": object()}]}, "returned object at x[0].y, not a JSON value"),
        ({1: 1, "1": 2}, "returned keys that are the same string in JSON at the top"),
    ]:
        with pytest.raises(BackendError, match="^myrt describe\\(\\) " + re.escape(why)):
            description(Describes(value), "myrt")
    deep: dict = {}
    deep["self"] = deep  # no RecursionError
    with pytest.raises(BackendError, match="nested deeper than 8 levels"):
        description(Describes(deep), "myrt")
    with pytest.raises(BackendError, match="more than the 65,536 allowed"):
        description(Describes({"x": "y" * 70_000}), "myrt")


# --- 4. the machine's memory or threads running out in describe() is not the plugin's fault -------------------------

@pytest.mark.parametrize(("mode", "why"), [
    ("describe_oom", "std::bad_alloc"),
    ("describe_threads", "out of memory in faultrt describe(): can't start new thread"),
])
def test_memory_or_threads_running_out_in_describe_is_a_memory_error_not_a_backend_error(fault, bundle, mode, why):
    """Wrapped as "faultrt cannot load ...: faultrt describe() failed: MemoryError: std::bad_alloc" (BackendError),
    where the warm-up and the golden inputs let the machine's failure through."""
    from runtimes.base import description

    fault(mode)
    with pytest.raises(MemoryError) as err:
        _opened(bundle)
    assert str(err.value) == why and not isinstance(err.value, BackendError)
    fault("")
    backend = runtimes.open_backend(bundle, read_manifest(bundle), RT.name)
    try:  # read again later (serving's /v1/models, export, the benchmarks): the same rule
        fault(mode)
        with pytest.raises(MemoryError):
            description(backend, RT.name)
    finally:
        backend.close()


def test_serve_whose_plugin_runs_out_of_memory_in_describe_exits_1_saying_so(bundle, tmp_path):
    """It exited 2 (bad input) with "faultrt describe() failed: MemoryError: std::bad_alloc"."""
    r = subprocess.run([sys.executable, "-m", "serve", "--model", f"m={bundle}", "--backend", RT.name, "--port",
                        "20912"], cwd=tmp_path, env=_serve_env("describe_oom"), capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert lines[0].endswith("cannot load model 'm': out of memory"), lines[0]


def test_a_hot_reload_whose_describe_runs_out_of_memory_or_threads_answers_as_the_machine_s(client):
    """Both answered 400 "... describe() failed: MemoryError ...", as for a broken plugin."""
    c, switch = client
    switch.write_text("describe_oom")
    r = c.post("/v2/repository/models/m/load")
    assert "out of memory while loading version" in r.json()["error"], r.text
    switch.write_text("describe_threads")
    r = c.post("/v2/repository/models/m/load")
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    switch.write_text("")
    assert c.post("/v2/repository/models/m/load").status_code == 200
