"""What the access log says of a client and which series /metrics exposes, through a real server: an IPv6 peer in
brackets, a forwarded client only when it is an IP address (and no made-up port), no `*_created` series (the
README's metric list is exactly what is exposed), and an unloaded model's readiness and queue depth at 0, not gone.
The backend is tests/fake_runtime.py."""

from __future__ import annotations

import gc
import json
import re
import socket
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_fixtures import animal_pngs, client_of, fake_server

from serve.launch import ServerProcess
from serve.metrics import Metrics

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("client-series") / "fake")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    with fake_server(bundle, tmp_path_factory.mktemp("client-series-server"), "--model-control-mode",
                     "explicit") as s:
        yield s


def _get(host: str, port: int, headers: bytes = b"", family: int = socket.AF_INET) -> tuple[str, int]:
    """GET /v1/models with `headers` on a connection of its own: its request id, and the client's own port."""
    request_id = uuid.uuid4().hex
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Id: " + request_id.encode()
                  + b"\r\n" + headers + b"\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        return request_id, s.getsockname()[1]


def _logged(server: ServerProcess, **fields: object) -> dict:
    """The log line with these fields (waited for: it is written once the answer is out)."""
    end = time.monotonic() + 10
    while True:
        for line in server.logs().splitlines():
            if line.startswith("{") and all((entry := json.loads(line)).get(k) == v for k, v in fields.items()):
                return entry
        assert time.monotonic() < end, f"no log line with {fields}"
        time.sleep(0.02)


def _client(server: ServerProcess, forwarded: bytes) -> tuple[str, int]:
    """The access log's `client` of a request from 127.0.0.1 (trusted by default) with X-Forwarded-For `forwarded`,
    and the request's own port."""
    request_id, port = _get("127.0.0.1", server.port, b"X-Forwarded-For: " + forwarded + b"\r\n")
    return _logged(server, msg="request", request_id=request_id)["client"], port


@pytest.mark.parametrize("forwarded", [b"unknown", b'evil","level":"error', b"\xff\xfe", b"1.2.3", b"",
                                       b"999.1.1.1", b"not an address"])
def test_a_forwarded_client_that_is_no_ip_address_logs_the_peer(server, forwarded):
    client, port = _client(server, forwarded)
    assert client == f"127.0.0.1:{port}"


@pytest.mark.parametrize(("forwarded", "logged"), [
    (b"203.0.113.7", "203.0.113.7"),  # no port given: none logged (it was `203.0.113.7:0`)
    (b"2001:db8::1", "2001:db8::1"),  # unbracketed, bare: it was `2001:db8::1:0`, itself an address
    (b"203.0.113.7:4711", "203.0.113.7:4711"),
    (b"[2001:db8::1]:4711", "[2001:db8::1]:4711"),
    (b"198.51.100.2, 203.0.113.7", "203.0.113.7"),  # the last hop before the trusted proxy, as uvicorn reads it
    (b"fe80::1%eth0", "fe80::1"),  # the zone names an interface of the proxy's host, and may be any text
    (b'fe80::1%x"y', "fe80::1"),
    (b"203.0.113.7:99999", "203.0.113.7"),  # no such port
])
def test_a_forwarded_ip_address_is_logged_without_a_made_up_port(server, forwarded, logged):
    assert _client(server, forwarded)[0] == logged


def test_an_untrusted_peers_forwarded_for_is_ignored_and_a_plain_peer_logged_as_host_port(server):
    request_id, port = _get("127.0.0.1", server.port)
    assert _logged(server, msg="request", request_id=request_id)["client"] == f"127.0.0.1:{port}"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_peer_is_logged_in_brackets_in_request_and_refused_lines(bundle, tmp_path):
    server = ServerProcess(["--model", f"fake={bundle}", "--backend", "fake", "--host", "::1"], tmp_path / "s.log",
                           fake_runtime.server_env(tmp_path))
    try:
        server.url = f"http://[::1]:{server.port}"  # it listens on ::1 alone
        server.wait_ready()
        request_id, port = _get("::1", server.port, family=socket.AF_INET6)
        assert _logged(server, msg="request", request_id=request_id)["client"] == f"[::1]:{port}"
        # ::1 is a trusted proxy by default: what it forwards that is no address leaves the peer, in brackets.
        request_id, port = _get("::1", server.port, b"X-Forwarded-For: unknown\r\n", socket.AF_INET6)
        assert _logged(server, msg="request", request_id=request_id)["client"] == f"[::1]:{port}"
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:  # refused below the app: its own line
            s.settimeout(10)
            s.connect(("::1", server.port))
            s.sendall(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 505")
            port = s.getsockname()[1]
        assert _logged(server, msg="refused", status=505)["client"] == f"[::1]:{port}"
    finally:
        server.stop()
    assert "Traceback" not in server.logs()


def _readme_metrics() -> set[str]:
    """The metric names the README's metric list gives (its paragraph on GET /metrics)."""
    text = README.read_text()
    start = text.index("**Metrics and logs.** `GET /metrics`")
    listed = text[start:text.index("Latency", start)]
    return set(re.findall(r"`(vitc_\w+|process_\*|python_gc_\*|python_info)", listed))


def test_metrics_have_no_created_series_and_are_the_readmes_list(server):
    with client_of(server) as c:
        answer = c.post("/v1/models/fake/classify", content=animal_pngs(1)[0], headers={"Content-Type": "image/png"})
        assert answer.status_code == 200  # every counter and histogram has a series
        text = c.get("/metrics").text
    assert "_created" not in text
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    vitc = {name for name in exposed if name.startswith("vitc_")}
    assert vitc == {name for name in _readme_metrics() if name.startswith("vitc_")}
    others = {"process_*" if n.startswith("process_") else "python_gc_*" if n.startswith("python_gc_") else n
              for n in exposed - vitc}
    assert others == {"process_*", "python_gc_*", "python_info"}


def _series(c: httpx.Client, name: str, model: str) -> list[float]:
    return [s.value for family in text_string_to_metric_families(c.get("/metrics").text) for s in family.samples
            if s.name == name and s.labels.get("model") == model]


def test_an_unloaded_model_reads_not_ready_and_an_empty_queue_until_loaded_again(server):
    with client_of(server) as c:
        assert _series(c, "vitc_model_ready", "fake") == [1.0]
        assert c.post("/v2/repository/models/fake/unload").status_code == 200
        assert c.post("/v1/models/fake/classify", content=b"x").status_code == 404
        # Still a series each, at 0: an alert on `vitc_model_ready == 0` fires for an unloaded model.
        assert _series(c, "vitc_model_ready", "fake") == [0.0]
        assert _series(c, "vitc_queue_depth", "fake") == [0.0]
        assert c.post("/v2/repository/models/fake/unload").status_code == 200  # unloaded again: nothing changes
        assert _series(c, "vitc_model_ready", "fake") == [0.0]
        assert c.post("/v2/repository/models/fake/load").status_code == 200
        assert _series(c, "vitc_model_ready", "fake") == [1.0]
        assert _series(c, "vitc_queue_depth", "fake") == [0.0]
        assert c.get("/v2/models/fake/ready").status_code == 200


def test_the_gauges_kept_at_0_hold_nothing_of_the_unloaded_batcher():
    class Batcher:
        depth, ready = 3.0, True

    batcher = Batcher()
    m = Metrics()
    m.add_model("m", "vit", "fake", "fp32", lambda b=batcher: b.depth, lambda b=batcher: float(b.ready))  # as served
    assert m.registry.get_sample_value("vitc_queue_depth", {"model": "m"}) == 3
    gone = weakref.ref(batcher)
    m.remove_model("m", "vit", "fake", "fp32")
    del batcher
    gc.collect()
    assert gone() is None  # the closed batcher is not kept alive by its series
    assert m.registry.get_sample_value("vitc_queue_depth", {"model": "m"}) == 0
    assert m.registry.get_sample_value("vitc_model_ready", {"model": "m"}) == 0
