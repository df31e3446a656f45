"""--shutdown-delay: at SIGTERM (or SIGINT) the server reports not ready at once and goes on answering, inference
included, for the delay, so that a Kubernetes rolling update, which removes the pod's endpoints while it sends
SIGTERM, does not refuse connections still routed to it; then it drains as without a delay. Real `python -m serve`
processes of tests/fake_runtime.py."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import fake_server

SERVE_ERROR = "python -m serve: error: "

V2 = "/v2/models/fake/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("shutdown-delay") / "fake")


def _get(url: str) -> httpx.Response:
    """One request on a connection of its own: a new connection is what a rolling update's clients open."""
    with httpx.Client(timeout=10) as c:
        return c.get(url)


def _model_ready_metric(url: str) -> float:
    lines = [ln for ln in _get(url + "/metrics").text.splitlines() if ln.startswith('vitc_model_ready{model="fake"}')]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _wait_not_ready(url: str, within: float = 2.0) -> httpx.Response:
    end = time.monotonic() + within
    while (r := _get(url + "/v2/health/ready")).status_code == 200 and time.monotonic() < end:
        time.sleep(0.02)
    return r


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_not_ready_but_answering_during_the_delay_then_the_port_closes(bundle, tmp_path, sig):
    """Before, the listener closed within milliseconds of SIGTERM: every new connection was refused, and readiness
    never answered "not ready" first."""
    delay = 3.0
    with fake_server(bundle, tmp_path, "--shutdown-delay", str(delay), "--graceful-timeout-s", "5") as server:
        url = server.url
        assert _get(url + "/v2/health/ready").status_code == 200 and _model_ready_metric(url) == 1
        server.proc.send_signal(sig)
        signalled = time.monotonic()
        r = _wait_not_ready(url)
        assert r.status_code == 400 and r.json() == {"ready": False}, r.text  # without the fix: ConnectError
        r = _get(url + "/v2/models/fake/ready")
        assert r.status_code == 400 and r.json() == {"name": "fake", "ready": False}, r.text
        assert _get(url + "/v1/models/fake").json()["ready"] is False
        assert _get(url + "/v1/models").json()["models"][0]["ready"] is False
        assert _model_ready_metric(url) == 0  # the README: "0 ... or shutting down"
        index = httpx.post(url + "/v2/repository/index", json={}, timeout=10).json()
        assert [(e["name"], e["state"], e.get("reason")) for e in index] == [
            ("fake", "UNAVAILABLE", "the server is shutting down")]
        assert httpx.post(url + "/v2/repository/index", json={"ready": True}, timeout=10).json() == []
        assert _get(url + "/v2/health/live").json() == {"live": True}  # liveness: not a reason to restart it
        end = time.monotonic() + 1  # within a tick of the event loop (0.1 s), answers close their connections
        while _get(url + "/v2/health/live").headers.get("connection") != "close" and time.monotonic() < end:
            time.sleep(0.02)
        with httpx.Client(timeout=10) as c:  # inference still served, on new connections
            for _ in range(3):
                r = c.post(url + V2, content=fake_runtime.request_body(1.0))
                assert r.status_code == 200 and r.json()["outputs"][0]["shape"][0] == 1, r.text
                # A keep-alive client is sent elsewhere, rather than left on a connection the drain closes.
                assert r.headers["connection"] == "close"
        assert time.monotonic() - signalled < delay, "the checks above outlasted the delay: the machine is too slow"
        assert server.proc.poll() is None  # the delay is not over
        assert server.proc.wait(delay + 20) == 0
        assert time.monotonic() - signalled >= delay - 0.2  # it waited the delay out
        assert _refused(server.port)
    entries = [json.loads(ln) for ln in server.logs().splitlines() if ln.startswith("{")]
    said = [e for e in entries if e["msg"].startswith("shutting down")]
    assert len(said) == 1 and said[0]["signal"] == sig.name and said[0]["shutdown_delay_s"] == delay, said
    assert any(e["msg"] == "stopped" for e in entries)


def test_a_second_signal_cuts_the_delay_short(bundle, tmp_path):
    with fake_server(bundle, tmp_path, "--shutdown-delay", "60", "--graceful-timeout-s", "5") as server:
        server.proc.send_signal(signal.SIGTERM)
        assert _wait_not_ready(server.url).status_code == 400
        assert server.proc.poll() is None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0  # not the 60 s of the delay, and a clean stop


def test_an_in_flight_request_still_finishes_after_the_delay(bundle, tmp_path):
    """The delay comes before the drain, which still answers what is in flight when the port closes."""
    with fake_server(bundle, tmp_path, "--shutdown-delay", "0.5", "--graceful-timeout-s", "10",
                     "--parallel", "1") as server, httpx.Client(base_url=server.url, timeout=20) as c:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(c.post, V2, content=fake_runtime.request_body(fake_runtime.SLOW))
            time.sleep(0.3)  # admitted: SLOW computes for a second, past the end of the delay
            server.proc.send_signal(signal.SIGTERM)
            assert slow.result().status_code == 200
        assert server.proc.wait(20) == 0


def test_without_a_delay_the_stop_is_immediate(bundle, tmp_path):
    """The default (0): Ctrl-C and local use stop at once, as before."""
    with fake_server(bundle, tmp_path, "--graceful-timeout-s", "5") as server:
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert time.monotonic() - signalled < 5
    assert "shutting down" not in server.logs()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "301", "soon"])
def test_a_bad_delay_is_refused_in_one_line(value, capsys, monkeypatch):
    from serve.__main__ import main

    monkeypatch.setenv("VITC_SHUTDOWN_DELAY", value)
    assert main(["--model", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(SERVE_ERROR + "invalid setting --shutdown-delay (VITC_SHUTDOWN_DELAY): "), err
    assert "\n" not in err, err
