"""A client must not be able to write to the server's log at will: what a library logs about a client's malformed
input (python-multipart's warning per bad form) is not an operator's warning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import animal_pngs, fake_server

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = "/v1/models/fake/classify"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("flood") / "fake")


def _entries(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_malformed_forms_write_nothing_to_the_log(bundle, tmp_path):
    png = animal_pngs(1)[0]
    with fake_server(bundle, tmp_path, "--no-access-log") as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        before = len(server.logs().splitlines())
        for _ in range(20):
            # An empty boundary: the form parser meets the image's bytes where the boundary should be.
            r = client.post(CLASSIFY, content=png, headers={"content-type": "multipart/form-data; boundary="})
            assert r.status_code == 400, r.text
        form = b"garbage\r\n--zz\r\ncontent-disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--zz--\r\n"
        r = client.post(CLASSIFY, content=form, headers={"content-type": "multipart/form-data; boundary=zz"})
        assert 400 <= r.status_code < 500, r.text
        ok = client.post(CLASSIFY, files=[("file", ("a.png", png, "image/png"))])
        assert ok.status_code == 200, ok.text
        lines = server.logs().splitlines()[before:]
    assert lines == [], lines  # no access log asked for: 22 requests, not a line


@pytest.mark.parametrize(("level", "shown"), [("warning", False), ("info", False), ("debug", True)])
def test_form_parser_lines_are_debug_lines(level, shown):
    code = ("import logging; from serve.logs import configure_logging; "
            f"configure_logging({level!r}); "
            "logging.getLogger('python_multipart.multipart').warning('Expected boundary character 45, got 137'); "
            "logging.getLogger('python_multipart.decoders').error('a later release, another module'); "
            "logging.getLogger('vitc.serve').warning('an operator warning')")
    err = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stderr
    entries = _entries(err)
    assert [e["msg"] for e in entries if e["logger"] == "vitc.serve"] == ["an operator warning"]
    parser = [e for e in entries if e["logger"].startswith("python_multipart")]
    assert [e["level"] for e in parser] == (["debug", "debug"] if shown else []), err
