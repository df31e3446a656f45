"""vitc_in_flight_requests reads 0 on an idle server: the /metrics scrape that reads it, and the health probes, are
not counted (they kept it at 1 for good, so an "in flight with no traffic" alert never cleared); a request being
served still is. A real server process of tests/fake_runtime.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import client_of, fake_server

V2 = "/v2/models/fake/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("in-flight") / "fake")


def _in_flight(client: httpx.Client) -> float:
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith("vitc_in_flight_requests ")]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


def test_an_idle_server_reads_0_and_a_request_being_served_1(bundle, tmp_path):
    (tmp_path / "hang").touch()
    try:
        with fake_server(bundle, tmp_path, "--parallel", "1") as server, client_of(server) as client, \
                ThreadPoolExecutor(1) as pool:
            assert _in_flight(client) == 0  # was 1: the scrape itself
            for path in ("/v2/health/live", "/v2/health/ready"):
                assert client.get(path).status_code == 200
                assert client.head(path).status_code == 200
            assert _in_flight(client) == 0
            hung = pool.submit(client.post, V2, content=fake_runtime.request_body(fake_runtime.HANG), timeout=20)
            end = time.monotonic() + 10
            while _in_flight(client) != 1 and time.monotonic() < end:  # the request reaches the app
                time.sleep(0.02)
            assert _in_flight(client) == 1  # the request being served, not the scrape
            (tmp_path / "hang").unlink()
            assert hung.result(timeout=20).status_code == 200
            assert _in_flight(client) == 0
    finally:
        (tmp_path / "hang").unlink(missing_ok=True)


def test_the_gauges_help_says_what_it_counts():
    from serve.metrics import NOT_IN_FLIGHT, Metrics

    text = Metrics().render().decode()
    assert "# HELP vitc_in_flight_requests HTTP requests being processed (not /metrics or the /v2/health probes" in text
    assert NOT_IN_FLIGHT == {"/metrics", "/v2/health/live", "/v2/health/ready"}
