"""The server under a cluster's limits: no usable temporary directory (a read-only root file system), no $HOME or
passwd entry (an arbitrary UID), memory or threads running out during a request, and PROMETHEUS_MULTIPROC_DIR set by
the platform. Each is answered as the server's own conventions say: served, or a 503 + Retry-After with one reason."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve_fixtures import in_process_server, start_server

from serve.routes.deps import OUT_OF_MEMORY, OUT_OF_THREADS

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = "/v1/models/fake/classify"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("cluster") / "fake")


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 700x700 noise PNG: over 1 MiB, what Starlette's form parser spools to a temporary file."""
    pixels = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    assert buf.tell() > 1 << 20
    return buf.getvalue()


@contextlib.contextmanager
def _app_client(bundle: Path, **settings: object) -> Iterator[TestClient]:
    from serve.app import create_app
    from serve.settings import Settings

    with fake_runtime.registered():
        s = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False, **settings)
        with TestClient(create_app(s)) as client:
            yield client


def _refused(r: httpx.Response, reason: str) -> None:
    """A 503 the client may retry: Retry-After, and the one-line JSON reason."""
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1" and r.json() == {"error": reason}


# --- multipart parts stay in memory ----------------------------------------------------------------------------


def test_a_multipart_image_over_1_mib_needs_no_temporary_directory(bundle, big_png, tmp_path, monkeypatch):
    from starlette.formparsers import MultiPartParser

    # What a read-only root file system leaves: no temporary directory (tempfile's choice is reset to a missing one).
    missing = str(tmp_path / "missing")
    monkeypatch.setenv("TMPDIR", missing)
    monkeypatch.setattr(tempfile, "tempdir", missing)
    with _app_client(bundle, max_files=2) as c:
        raw = c.post(CLASSIFY, content=big_png, headers={"content-type": "image/png"})
        assert raw.status_code == 200, raw.text
        one = c.post(CLASSIFY, files={"file": ("big.png", big_png, "image/png")})
        assert one.status_code == 200, one.text
        assert one.json() == raw.json()
        two = c.post(CLASSIFY, files=[("file", (f"{n}.png", big_png, "image/png")) for n in "ab"])
        assert two.status_code == 200 and two.json() == [raw.json(), raw.json()], two.text
        # The form's checks are the same as before: too many files, a big text field.
        r = c.post(CLASSIFY, files=[("file", (f"{i}.png", b"x", "image/png")) for i in range(3)])
        assert r.status_code == 400 and "files" in r.json()["error"], r.text
        r = c.post(CLASSIFY, files={"file": (None, b"x" * 70_000, "text/plain")})
        assert r.status_code == 422 and "no filename" in r.json()["error"], r.text
    assert MultiPartParser.spool_max_size == 1 << 20  # Starlette's class is left as it was


# --- OpenVINO's telemetry consent check without a home directory ------------------------------------------------


def test_openvino_loads_when_the_home_directory_cannot_be_found(tmp_path):
    """An arbitrary UID without $HOME or a passwd entry: Path.home() raises, which OpenVINO's consent check lets
    through every read_model. The shim takes it as no consent (telemetry off), and the model loads."""
    pytest.importorskip("openvino")
    code = (
        "import pathlib\n"
        "def home(cls):\n"
        "    raise RuntimeError('Could not determine home directory.')\n"
        "pathlib.Path.home = classmethod(home)\n"
        "from runtimes import telemetry\n"
        "telemetry.off()\n"
        "from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker\n"
        "assert OptInChecker().check(False) == ConsentCheckResult.DECLINED\n"
        "import openvino as ov\n"
        f"model = ov.Core().read_model({str(REPO / 'tests/data/legacy-bundle-v1/model.onnx')!r})\n"
        "print('LOADED', len(model.inputs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("LOADED 1"), out.stderr[-2000:]


def test_an_explicit_opt_in_is_still_honoured(tmp_path, monkeypatch):
    pytest.importorskip("openvino_telemetry")
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    from runtimes import telemetry

    telemetry.off()
    (tmp_path / "intel").mkdir()
    (tmp_path / "intel" / "openvino_telemetry").write_text("1")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert OptInChecker().check(False) == ConsentCheckResult.ACCEPTED
    (tmp_path / "intel" / "openvino_telemetry").unlink()
    assert OptInChecker().check(False) == ConsentCheckResult.DECLINED  # no file: no consent


# --- memory or threads running out during a request -------------------------------------------------------------


def _no_memory(*args: object, **kwargs: object) -> None:
    raise MemoryError


async def _no_memory_async(*args: object, **kwargs: object) -> bytes:
    raise MemoryError


def _no_thread(*args: object, **kwargs: object) -> None:
    raise RuntimeError("can't start new thread")


def test_reading_a_body_without_memory_is_a_503(bundle, big_png, monkeypatch, caplog):
    from starlette.requests import Request

    png = big_png
    with _app_client(bundle) as c:
        monkeypatch.setattr(Request, "body", _no_memory_async)
        with caplog.at_level("WARNING"):
            # The fast path, the FastAPI route (a query the fast path leaves to it), a multipart form, and /v2.
            _refused(c.post(CLASSIFY, content=png, headers={"content-type": "image/png"}), OUT_OF_MEMORY)
            _refused(c.post(CLASSIFY + "?top_k=2&x=1", content=png, headers={"content-type": "image/png"}),
                     OUT_OF_MEMORY)
            _refused(c.post(CLASSIFY, files={"file": ("a.png", png, "image/png")}), OUT_OF_MEMORY)
            _refused(c.post("/v2/models/fake/infer", content=fake_runtime.request_body(1.0)), OUT_OF_MEMORY)
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        monkeypatch.undo()
        assert c.post(CLASSIFY, content=png, headers={"content-type": "image/png"}).status_code == 200


def test_a_decode_or_inference_thread_that_cannot_start_is_a_503(bundle, big_png, monkeypatch, caplog):
    files = [("file", ("a.png", big_png, "image/png")), ("file", ("b.png", big_png, "image/png"))]
    with _app_client(bundle) as c:
        pool = c.app.state.work_pool._pool  # two files: each goes to a decode thread
        monkeypatch.setattr(pool, "submit", _no_thread)
        _refused(c.post(CLASSIFY, files=files), OUT_OF_THREADS)
        monkeypatch.setattr(pool, "submit", _no_memory)
        _refused(c.post(CLASSIFY, files=files), OUT_OF_MEMORY)
        monkeypatch.undo()
        assert c.post(CLASSIFY, files=files).status_code == 200
        batcher_pool = c.app.state.models["fake"].batcher._pool
        monkeypatch.setattr(batcher_pool, "submit", _no_thread)
        with caplog.at_level("WARNING"):
            _refused(c.post(CLASSIFY, content=big_png, headers={"content-type": "image/png"}), OUT_OF_THREADS)
            _refused(c.post("/v2/models/fake/infer", content=fake_runtime.request_body(1.0)), OUT_OF_THREADS)
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert any(r.getMessage() == "inference ran out of memory or threads" for r in caplog.records)
        monkeypatch.undo()
        assert c.post(CLASSIFY, content=big_png, headers={"content-type": "image/png"}).status_code == 200


def test_a_body_the_parser_has_no_memory_for_is_a_503_not_a_client_error(bundle, big_png, monkeypatch):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    with in_process_server(bundle) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        monkeypatch.setattr(HttpToolsProtocol, "on_body", _no_memory)  # gathering the body: not chunked
        r = c.post(CLASSIFY, content=big_png, headers={"content-type": "image/png"})
        _refused(r, OUT_OF_MEMORY)
        assert r.headers["connection"] == "close"  # the parser stopped: nothing more is read on it
        # Before the body (the request line): refused below the app, the same way.
        monkeypatch.setattr(HttpToolsProtocol, "on_url", _no_memory)
        r = c.get("/v2/health/live")
        _refused(r, OUT_OF_MEMORY)
        assert r.headers["connection"] == "close"
        monkeypatch.undo()
        assert c.post(CLASSIFY, content=big_png, headers={"content-type": "image/png"}).status_code == 200
        assert 'vitc_protocol_refusals_total{status="503"} 1.0' in c.get("/metrics").text


# --- PROMETHEUS_MULTIPROC_DIR ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True], ids=["missing-dir", "writable-dir"])
def test_the_server_ignores_prometheus_multiproc_dir(bundle, tmp_path, exists):
    """A platform's PROMETHEUS_MULTIPROC_DIR switches prometheus_client to files for several processes: a missing
    directory stopped the start with a traceback, a writable one got files unasked. vitc is one process: the
    variable is dropped, with one warning."""
    multiproc = tmp_path / "prom"
    if exists:
        multiproc.mkdir()
    env = {**fake_runtime.server_env(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    with start_server(["--model", f"fake={bundle}", "--backend", "fake"], tmp_path / "server.log", env) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post("/v2/models/fake/infer", content=fake_runtime.request_body(1.0)).status_code == 200
            metrics = c.get("/metrics")
            assert metrics.status_code == 200 and "vitc_requests_total" in metrics.text
    logs = server.logs()
    assert server.proc.returncode == 0 and "Traceback" not in logs, logs[-2000:]
    warnings = [ln for ln in logs.splitlines() if "ignored environment variables" in ln and "PROMETHEUS" in ln]
    assert len(warnings) == 1 and '"level": "warning"' in warnings[0], logs[-2000:]
    assert not exists or list(multiproc.iterdir()) == []
    assert exists or not multiproc.exists()
