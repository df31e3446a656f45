"""Threads that cannot start (a pids limit, ulimit -u), simulated by refusing to start threads of some names: the
start is one line and exit 1 naming what could not start, with no "listening" line before it (it was uvicorn's
traceback and exit 3 after one); a hot load is 503 + Retry-After with the served models serving on (it was a 500,
every time: the loads' pool started its thread at the first load); and a repository model that failed to load has
readiness and queue-depth series at 0. The backend is tests/fake_runtime.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import fake_runtime
import httpx
import numpy as np
import pytest

from models.bundle import read_manifest, write_manifest
from models.cli import WorkFailed
from serve.launch import REPO
from serve.registry import load_models
from serve.routes.deps import OUT_OF_THREADS
from serve.settings import Settings

CONFIG = """name: "{name}"
platform: "fake_platform"
max_batch_size: 8
input [ {{ name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 32, 32 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }} ]
"""
# The fake runtime under a name whose package is not installed: a model of it is skipped at start.
NO_THREAD = "can't start new thread"  # what Python's Thread.start raises under a pids or ulimit -u limit
# Refuses threads whose name starts with $FAIL_THREADS, then runs `python -m serve` with the arguments given.
WRAPPER = """import os, runpy, threading
real = threading.Thread.start
def start(self):
    if self.name.startswith(os.environ["FAIL_THREADS"]):
        raise RuntimeError("can't start new thread")
    real(self)
threading.Thread.start = start
runpy.run_module("serve", run_name="__main__", alter_sys=True)
"""


@contextlib.contextmanager
def failing_threads(prefix: str) -> Iterator[list[str]]:
    """Threads whose name starts with `prefix` cannot start, as under a pids limit; the names refused."""
    real, refused = threading.Thread.start, []

    def start(self: threading.Thread) -> None:
        if self.name.startswith(prefix):
            refused.append(self.name)
            raise RuntimeError(NO_THREAD)
        real(self)

    with mock.patch.object(threading.Thread, "start", start):
        yield refused


def running(prefix: str, wait_s: float = 2.0) -> list[str]:
    """The threads named `prefix...` still alive once those that are ending had `wait_s` to end."""
    end = time.monotonic() + wait_s
    while True:
        alive = [t.name for t in threading.enumerate() if t.name.startswith(prefix)]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_runtime.registered():
        yield


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("thread-limits") / "fake")


def add_model(repo: Path, bundle: Path, name: str, runtime: str = "fake") -> None:
    """repo/name/1 holding the fake artifact alone (as export.triton writes a real one), and its config.pbtxt."""
    dest = repo / name / "1"
    dest.mkdir(parents=True)
    shutil.copy(bundle / fake_runtime.WEIGHTS, dest / fake_runtime.WEIGHTS)
    m = read_manifest(bundle)
    artifact = next(dataclasses.replace(a, runtime=runtime) for a in m.artifacts if a.runtime == "fake")
    write_manifest(dest, dataclasses.replace(m, artifacts=(artifact,)))
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name))


@pytest.fixture
def repo(tmp_path, bundle) -> Path:
    add_model(tmp_path / "repo", bundle, "fake")
    return tmp_path / "repo"


@contextlib.contextmanager
def client(settings: Settings) -> Iterator[httpx.Client]:
    from fastapi.testclient import TestClient

    from serve.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


def served(repo: Path, **kw: object) -> Settings:
    return Settings(model_control_mode="explicit", model_repository=repo, access_log=False, graceful_timeout_s=5, **kw)


def infer(c: httpx.Client, name: str) -> httpx.Response:
    x = np.full((1, 3, 32, 32), 0.25, np.float32)
    return c.post(f"/v2/models/{name}/infer", json={"inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})


def series(c: httpx.Client, metric: str, model: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in c.get("/metrics").text.splitlines()
            if line.startswith(f'{metric}{{model="{model}"}}')]


def test_the_cli_names_the_threads_that_cannot_start_in_one_line_and_exit_1_never_listening(bundle, tmp_path):
    wrapper = tmp_path / "limited.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, **fake_runtime.server_env(tmp_path), "FAIL_THREADS": "infer-fake"}
    proc = subprocess.run([sys.executable, str(wrapper), "--model", f"fake={bundle}", "--backend", "fake",
                           "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert '"listening"' not in out and "Traceback" not in out and "uvicorn" not in out, out
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("{")]  # beside the JSON log lines
    assert errors == ["python -m serve: error: cannot start 2 inference threads for model 'fake': out of memory or "
                      "threads (a thread could not start: a memory, pids or ulimit -u limit)"], out


@pytest.mark.parametrize(("prefix", "says"), [
    ("decode", "cannot start 3 decode threads (--decode-threads): out of memory or threads"),
    ("vitc-load", "cannot start the thread of the repository's loads: out of memory or threads"),
    ("infer-fake", "cannot start 2 inference threads for model 'fake': out of memory or threads"),
])
def test_every_pool_starts_before_the_server_says_it_listens(fake, bundle, prefix, says):
    from serve.app import create_app
    from serve.server import start_threads

    models = load_models(Settings(models=[f"fake={bundle}"], backend="fake", decode_threads=3))
    app = create_app(Settings(models=[f"fake={bundle}"], backend="fake", decode_threads=3), models)
    try:
        with failing_threads(prefix) as refused, pytest.raises(WorkFailed) as failed:
            start_threads(app)
        assert refused and str(failed.value).startswith(says), failed.value
        # Nothing of the start is left running: not the pools started before, nor the one that failed.
        assert running("decode") == running("vitc-load") == running("infer-fake") == []
    finally:
        for model in models.values():
            model.backend.close()


def test_a_load_whose_inference_threads_cannot_start_is_503_and_the_served_models_serve_on(fake, repo, bundle):
    with client(served(repo)) as c:
        add_model(repo, bundle, "other")
        closed, close = [], fake_runtime.FakeBackend.close

        def counted(self: fake_runtime.FakeBackend) -> None:
            closed.append(self)
            close(self)

        with failing_threads("infer-") as refused, mock.patch.object(fake_runtime.FakeBackend, "close", counted):
            for name in ("other", "fake"):  # a new model, and a new version of the one served
                r = c.post(f"/v2/repository/models/{name}/load")
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert r.json() == {"error": OUT_OF_THREADS}
            assert refused == ["infer-other_0", "infer-fake_0"] and len(closed) == 2  # both loaded runtimes freed
            assert c.get("/v2/models/fake/ready").status_code == 200 and infer(c, "fake").status_code == 200
        reason = {e["name"]: e.get("reason", "") for e in c.post("/v2/repository/index").json()}["other"]
        assert "cannot start 2 inference threads for model 'other'" in reason, reason
        assert len(running("infer-fake", 0)) == 2 and running("infer-other") == []  # none left of the failed loads
        assert series(c, "vitc_model_ready", "other") == [0.0]  # never served, but seen by `== 0`
        # Once threads can start again, the same load succeeds.
        assert c.post("/v2/repository/models/other/load").status_code == 200
        assert infer(c, "other").status_code == 200 and series(c, "vitc_model_ready", "other") == [1.0]


def test_the_loads_thread_starts_with_the_server(fake, repo):
    """It started at the first load: once a pids limit was reached, every load was a 500 with a traceback."""
    with client(served(repo)) as c:
        assert running("vitc-load", 0) == ["vitc-load_0"]
        with failing_threads("vitc-load") as refused:
            assert c.post("/v2/repository/models/fake/load").status_code == 200
        assert refused == []


def test_a_runtime_thread_pool_that_cannot_start_during_a_load_is_503(fake, repo):
    """onnxruntime's own threads: 'pthread_create failed ... Resource temporarily unavailable', which the loader
    raises as a MemoryError from it; it was answered 400, 'out of memory', as if the model were at fault."""
    def load_model(*_: object) -> None:
        try:
            raise RuntimeError("pthread_create failed, error code: 11 error msg: Resource temporarily unavailable")
        except RuntimeError as exc:
            raise MemoryError("out of memory loading 'fake-fp32' on fake") from exc

    with client(served(repo)) as c, mock.patch("serve.repository.load_model", load_model):
        r = c.post("/v2/repository/models/fake/load")
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json() == {"error": OUT_OF_THREADS}
        assert infer(c, "fake").status_code == 200


def test_a_repository_model_that_failed_to_load_has_series_at_0(fake, repo, bundle):
    add_model(repo, bundle, "missing", runtime="absent")  # skipped at start: its runtime is not installed
    with client(served(repo)) as c:
        for metric in ("vitc_model_ready", "vitc_queue_depth"):
            assert series(c, metric, "missing") == [0.0], metric
        assert series(c, "vitc_model_ready", "fake") == [1.0]
        add_model(repo, bundle, "later")  # a hot load that fails, of a model never served
        (repo / "later" / "config.pbtxt").write_text("not a config")
        assert c.post("/v2/repository/models/later/load").status_code == 400
        assert series(c, "vitc_model_ready", "later") == [0.0]
        # A served model's failed reload keeps its live series.
        (repo / "fake" / "config.pbtxt").write_text("not a config")
        assert c.post("/v2/repository/models/fake/load").status_code == 400
        assert series(c, "vitc_model_ready", "fake") == [1.0]


# What OpenVINO 2026.4 raised loading a model as user 65534 under `ulimit -u 2`: its cause comes last, after the
# outer words (first_line kept 'Failed to create plugin ...' alone, and the server said 'out of memory').
OV_NO_THREAD = (
    "Exception from src/inference/src/cpp/core.cpp:117:\nException from src/inference/src/dev/core_impl.cpp:847:\n"
    'Failed to create plugin "/venv/openvino/libs/libopenvino_intel_cpu_plugin.so" for device CPU\n'
    "Please, check your environment\nException from src/plugins/intel_cpu/src/plugin.cpp:921:\n"
    "Resource temporarily unavailable\n\n\n\n")
OV_BAD_ALLOC = "Exception from src/inference/src/cpp/core.cpp:117:\n[ GENERAL_ERROR ] std::bad_alloc\n"
THREADS = "out of memory or threads (a thread could not start: a memory, pids or ulimit -u limit)"


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    from test_serve_fixtures import micro_bundle

    return micro_bundle(tmp_path_factory)


@pytest.mark.parametrize(("raised", "says"), [(OV_NO_THREAD, THREADS), (OV_BAD_ALLOC, "out of memory")])
def test_openvino_failing_to_load_for_threads_says_so_as_onnxruntime_does(ov_bundle, monkeypatch, raised, says):
    """OpenVINO's error is several lines: its cause was dropped with all but the first, so a thread that could not
    start read as 'out of memory', where onnxruntime's one-line error said 'out of memory or threads'."""
    import runtimes.openvino as ov

    def failing(*_: object, **__: object) -> None:
        raise RuntimeError(raised)

    monkeypatch.setattr(ov, "_compile", failing)
    with pytest.raises(WorkFailed) as failed:
        load_models(Settings(models=[f"b={ov_bundle}"], backend="openvino"))
    assert str(failed.value) == f"cannot load model 'b': {says}"
    cause = failed.value.__cause__  # the loader's MemoryError keeps OpenVINO's words, its cause included
    assert isinstance(cause, MemoryError) and str(cause).endswith(ov.reason(RuntimeError(raised))), cause
    assert ov.reason(RuntimeError(OV_NO_THREAD)) == ('Failed to create plugin "/venv/openvino/libs/libopenvino_intel_'
                                                     'cpu_plugin.so" for device CPU: Resource temporarily unavailable')


def test_openvino_errors_keep_their_cause_on_one_line(tmp_path):
    """A real OpenVINO error: its reason is on the last line ('FrontEnd API failed with GeneralFailure' alone said
    nothing of the file)."""
    pytest.importorskip("openvino")
    import runtimes.openvino as ov

    with pytest.raises(RuntimeError) as raised:
        ov.core().read_model(str(tmp_path / "missing.xml"))
    said = ov.reason(raised.value)
    assert "\n" not in said and "Exception from" not in said and "Check '" not in said, said
    assert said.endswith(f'Could not open the file: "{tmp_path / "missing.xml"}"'), said


def _tasks_of(uid: int) -> int:
    """The processes and threads `uid` runs now (what RLIMIT_NPROC counts)."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/task/[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        count += any(ln.startswith("Uid:") and ln.split()[1] == str(uid) for ln in lines)
    return count


# Where the throw-away uid is taken from: below 65536 (a container's user namespace may map no more), clear of
# nobody's 65534 and of the 64999 that testers run unprivileged commands as.
THROWAWAY_UIDS = range(60000, 64999)


def _throwaway_uid() -> int:
    """A uid no account names and no process runs as, picked by this test process's pid (xdist's workers pick apart):
    the thread limit counts every task of its uid, so one shared with other work (nobody's) moved it whenever one of
    theirs started or ended."""
    accounts = {fields[2] for fields in (line.split(":") for line in Path("/etc/passwd").read_text().splitlines())
                if len(fields) > 2}
    first = os.getpid() % len(THROWAWAY_UIDS)
    for uid in (*THROWAWAY_UIDS[first:], *THROWAWAY_UIDS[:first]):
        if str(uid) not in accounts and _tasks_of(uid) == 0:
            return uid
    pytest.skip(f"no unused uid in {THROWAWAY_UIDS.start}..{THROWAWAY_UIDS.stop - 1}")


@pytest.mark.parametrize("spare", [0, 1])
def test_openvino_under_a_real_thread_limit_is_one_line_out_of_memory_or_threads(ov_bundle, tmp_path, spare):
    """The real thing: `python -m serve --backend openvino` as an unprivileged user under `ulimit -u` (root is
    exempt from it). With no thread to spare the CPU plugin cannot be created (the cause on the last of OpenVINO's
    lines: this said 'out of memory'); with one, compiling fails (the cause on its first line)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the server as another user under ulimit -u")
    user, caps = _throwaway_uid(), "+dac_read_search,+dac_override"  # to read the venv, the bundle and the source
    as_user = [setpriv, "--reuid", str(user), "--regid", str(user), "--clear-groups", "--inh-caps", caps,
               "--ambient-caps", caps, "--"]
    if subprocess.run([*as_user, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot switch users here")
    limit = 1 + spare  # the server's main thread, and `spare` more: its uid runs nothing else
    env = {**os.environ, "HOME": str(tmp_path), "OPENBLAS_NUM_THREADS": "1"}  # numpy's BLAS starts no thread
    tmp_path.chmod(0o777)
    command = [*as_user, sys.executable, "-m", "serve", "--model", f"b={ov_bundle}", "--backend", "openvino",
               "--port", "0", "--no-access-log"]
    proc = subprocess.run(["bash", "-c", f'ulimit -u {limit} && exec "$@"', "limited", *command], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out and '"listening"' not in out, out
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert errors == [f"python -m serve: error: cannot load model 'b': {THREADS}"], out
