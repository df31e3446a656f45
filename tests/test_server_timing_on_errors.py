"""Every answer of an inference route carries Server-Timing, its refusals too: an unknown model and a bad top_k are
refused before any stage is timed, and their answers had no header at all (a client's latency split then had a hole
exactly where its errors were). Other routes keep answering without one."""

from __future__ import annotations

import io
from pathlib import Path

import fake_runtime
import pytest
from fastapi.testclient import TestClient
from PIL import Image


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    """The app on the fake runtime (its fast classify path included)."""
    from serve.app import create_app
    from serve.settings import Settings

    bundle: Path = fake_runtime.write_bundle(tmp_path_factory.mktemp("timing") / "fake")
    with fake_runtime.registered():
        with TestClient(create_app(Settings(models=[f"fake={bundle}"], backend="fake", access_log=False))) as c:
            yield c


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _stages(header: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, v in (part.split(";dur=") for part in header.split(","))}


@pytest.mark.parametrize(("path", "kind", "status"), [
    ("/v1/models/nope/classify", "image", 404),
    ("/v1/models/fake/classify?top_k=0", "image", 422),
    ("/v1/models/fake/classify?top_k=x", "image", 422),
    ("/v2/models/nope/infer", "json", 404),
    ("/v2/models/fake/versions/9/infer", "json", 404),
    ("/v1/models/fake/classify", "image", 200),
])
def test_every_inference_answer_has_server_timing(client, path, kind, status):
    r = client.post(path, content=_png() if kind == "image" else b"{}",
                    headers={"content-type": "image/png" if kind == "image" else "application/json"})
    assert r.status_code == status, r.text
    stages = _stages(r.headers["server-timing"])
    assert stages["total"] >= 0 and all(v >= 0 for v in stages.values())
    assert status != 200 or {"decode", "compute"} <= stages.keys(), stages


def test_other_routes_answer_without_it(client):
    for path in ("/v2/health/ready", "/v1/models", "/metrics"):
        r = client.get(path)
        assert r.status_code == 200 and "server-timing" not in r.headers, path


def test_a_forms_queue_and_compute_are_those_of_its_image_answered_last(tmp_path):
    """Eight files, one batch each (max batch size 1): the Server-Timing's queue + compute is the wait of the image
    answered last, so at least the mean of the images' waits (the statistics' sums over eight). It was the first
    image's, which left the seven later batches out."""
    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path / "fake")
    files = [("file", (f"{i}.png", _png(), "image/png")) for i in range(8)]
    with fake_runtime.registered():
        with TestClient(create_app(Settings(models=[f"fake={bundle}"], backend="fake", access_log=False,
                                            max_batch_size=1, max_queue_delay_ms=0))) as c:
            r = c.post("/v1/models/fake/classify", files=files)
            stats = c.get("/v2/models/fake/stats").json()["model_stats"][0]["inference_stats"]
    assert r.status_code == 200, r.text
    stages = _stages(r.headers["server-timing"])
    assert stats["queue"]["count"] == 8, stats
    mean_ms = (stats["queue"]["ns"] + stats["compute_infer"]["ns"]) / 8 / 1e6
    assert stages["queue"] + stages["compute"] >= mean_ms - 0.002, (stages, mean_ms)  # the header's 3 decimals


def test_a_type_without_a_media_type_is_quoted_and_a_form_of_too_many_fields_says_its_limit(client):
    """A Content-Type of ";charset=x" was answered "unsupported content type 'none'"; a form past the parser's count
    of non-file fields said "more than N parts ... and 16 other fields", which is not what the parser counts."""
    r = client.post("/v1/models/fake/classify", content=b"abc", headers={"content-type": ";charset=x"})
    assert r.status_code == 415 and "unsupported content type ';charset=x'" in r.json()["error"], r.text
    fields = [(f"t{i}", (None, b"x")) for i in range(64 + 17)]
    r = client.post("/v1/models/fake/classify", files=fields)
    assert r.status_code == 400, r.text
    said = r.json()["error"]
    assert said == "the form has more than 80 fields that are not files (the most: --max-files 64, plus 16)", said
