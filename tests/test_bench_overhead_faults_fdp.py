"""Faults around the serving-overhead benchmark (fDP): `--port N` after the cold starts left N in TIME_WAIT, a server
that fails to start or fails mid-run (one line, every server stopped, what was measured saved marked partial),
`gpu_check` hung up by its terminal, and a bench cache entry whose manifest cannot be read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from stand_in_http import StandInHandler, stand_in_server
from test_serve_fixtures import micro_bundle

from benchmarks import loadgen, overhead
from benchmarks.naive_server import port_problem
from serve.launch import REPO

PROG = "python -m benchmarks.overhead"


def _time_wait_port() -> int:
    """A loopback port as a stopped server leaves it: its listener gone, its end of a connection in TIME_WAIT."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and vitc's server listen
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's end closes first (as vitc's does after a readiness probe): it stays behind
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):  # the state the tests need: a plain bind is refused
        plain.bind(("127.0.0.1", port))
    return port


def _time_wait_port_with_free_neighbours(count: int) -> int:
    """A TIME_WAIT port N whose N+1 .. N+count-1 are free (overhead's --port N takes N, N+1, N+2)."""
    for _ in range(50):
        port = _time_wait_port()
        if port + count <= 65535 and not any(port_problem(port + i) for i in range(1, count)):
            return port
    pytest.skip("no port with free neighbours found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live(where: Callable[[Path, list[str]], bool]) -> list[int]:
    """The pids of live (not zombie) processes whose /proc entry and stat fields after the name satisfy `where`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] not in "ZX" and where(entry, fields):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _children_on(port: int) -> list[int]:
    """This process's child processes started with `--port PORT` (the servers overhead starts), still running."""
    def started_on(entry: Path, fields: list[str]) -> bool:
        args = (entry / "cmdline").read_bytes().split(b"\0")
        return int(fields[1]) == os.getpid() and [b"--port", str(port).encode()] in [
            args[i:i + 2] for i in range(len(args) - 1)]

    return _live(started_on)


# --- 1. --port N: the cold starts leave N in TIME_WAIT; a server that cannot start is one line -------------------

def test_a_port_left_in_time_wait_is_free_for_the_hand_written_server_and_a_listened_one_is_not():
    assert port_problem(_time_wait_port()) is None  # uvicorn binds it (SO_REUSEADDR), so the check must too
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert "cannot listen on 127.0.0.1:" in port_problem(taken.getsockname()[1])


def test_the_hand_written_server_starts_on_the_port_a_cold_start_just_left(tmp_path_factory):
    """The sequence of `--port N`: vitc's cold starts on N, each stopped, then the hand-written server on N."""
    bundle, port = micro_bundle(tmp_path_factory), _free_port()
    for backend in ("onnxruntime", "openvino"):
        overhead.Server("vitc", bundle, backend, port=port).stop()  # OpenVINO's leaves N in TIME_WAIT
    naive = overhead.Server("naive", bundle, port=port)  # exited 2, "Address already in use", a RuntimeError
    try:
        seconds, _ = naive.post(overhead.request_image())
        assert seconds > 0
    finally:
        naive.stop()


@pytest.fixture
def damaged_bundle(tmp_path_factory, tmp_path) -> Path:
    """A copy of the micro bundle whose ONNX file is truncated: its manifest reads, a server refuses it."""
    bundle = tmp_path / "damaged"
    shutil.copytree(micro_bundle(tmp_path_factory), bundle)
    onnx = bundle / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    return bundle


def test_a_server_that_exits_as_it_starts_is_one_line_and_the_time_wait_port_is_not_refused(damaged_bundle, tmp_path,
                                                                                           capsys):
    port = _time_wait_port_with_free_neighbours(3)
    out = tmp_path / "results"
    code = overhead.main(["--bundle", str(damaged_bundle), "--rounds", "1", "--slice", "0.01", "--saturation",
                          "0.1", "--saturation-rounds", "1", "--concurrency", "1", "--cold-starts", "1",
                          "--port", str(port), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    # The server refused the bundle it was given (its exit code 2): the run's input, exit 2.
    assert code == 2, err
    assert err[-1].startswith(f"{PROG}: error: vitc-onnxruntime did not start: the server exited with code 2: "), err
    assert "cannot listen" not in err[-1] and "(log: " in err[-1]
    assert err[-1].endswith("nothing was measured, nothing written") and "Traceback" not in "".join(err)
    assert not (out.exists() and any(out.iterdir())) and not _children_on(port)
    log = Path(err[-1].split("(log: ")[1].split(")")[0])
    assert "error" in log.read_text()  # kept: the server's own reason
    shutil.rmtree(log.parent)


# --- 4. a server that fails mid-run ------------------------------------------------------------------------------

def _classified(port: int) -> bool:
    """Whether the vitc server on `port` has answered a classify request (its /metrics count one)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return False
    return any(line.startswith("vitc_requests_total") and "classify" in line and float(line.rsplit(" ", 1)[1]) > 0
               for line in text.splitlines())


def _kill_once_measured(port: int, killed: list[int]) -> threading.Thread:
    """Kill -9 the server started with --port PORT once the run has sent it a request (as the tester killed one
    mid-run)."""
    def watch() -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            for pid in _children_on(port):
                if _classified(port):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_server_killed_mid_run_ends_it_with_one_line_and_a_partial_result(tmp_path_factory, tmp_path, capsys):
    bundle, out = micro_bundle(tmp_path_factory), tmp_path / "results"
    port = _time_wait_port_with_free_neighbours(3)  # the cold starts leave it so anyway
    killed: list[int] = []
    watcher = _kill_once_measured(port + 2, killed)  # vitc on OpenVINO
    code = overhead.main(["--bundle", str(bundle), "--rounds", "200", "--slice", "0.1", "--saturation", "0.2",
                          "--saturation-rounds", "1", "--concurrency", "1", "--cold-starts", "1",
                          "--port", str(port), "--out", str(out)])
    watcher.join(5)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert killed and code == 1, err
    line = err[-1]
    assert line.startswith(f"{PROG}: error: vitc-openvino (port {port + 2}): POST /v1/models/m/classify: "), line
    assert "the server was killed by SIGKILL" in line and "marked partial" in line and "Traceback" not in captured.err
    log = Path(line.split("(log: ")[1].split(")")[0])
    assert log.is_file()  # the failed server's log is kept, and named
    shutil.rmtree(log.parent)
    (json_path,) = out.glob("*-overhead-partial.json")
    doc = json.loads(json_path.read_text())
    assert doc["partial"]["stopped_during"] == "concurrency 1" and doc["partial"]["measured"] == ["cold starts"]
    assert doc["partial"]["not_measured"] == ["concurrency 1", "saturation"] and "verdict" not in doc
    assert set(doc["cold_start"]) == {"onnxruntime", "openvino"} and doc["cold_start"]["onnxruntime"]["runs"]
    md = json_path.with_suffix(".md").read_text()
    assert "PARTIAL" in md and "the run stopped during concurrency 1" in md and md in captured.out
    assert not any(_children_on(p) for p in (port, port + 1, port + 2))  # every server stopped


class _Answers(StandInHandler):
    """A stand-in for a server gone wrong: `status` and `body` for every classify, garbage /metrics."""

    status, body = 200, b""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.read_body()
        self.send_body(self.body, self.status)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_body(b"vitc_batch_size_count{model=\"m\"} many\n")


def _on_stand_in(url: str, tmp_path: Path) -> overhead.Server:
    """A Server object talking to the stand-in at `url` (no process of its own: its requests are the real code's)."""
    server = object.__new__(overhead.Server)
    server.kind, server.name, server.port = "vitc", "vitc-openvino", int(url.rsplit(":", 1)[1])
    server.proc, server.failed, server._own_dir, server.log = None, False, None, tmp_path / "vitc-openvino.log"
    server.path = "/v1/models/m/classify"
    server.conn = server._connect()
    return server


@pytest.mark.parametrize(("status", "body", "said"), [
    (500, b'{"error": "x"}', "HTTP 500 Internal Server Error"),
    (200, b"<html>hi</html>", "HTTP 200 but a bad answer: not JSON"),
])
def test_an_error_status_or_a_bad_answer_fails_the_server_by_name(tmp_path, status, body, said):
    handler = type("H", (_Answers,), {"status": status, "body": body})
    with stand_in_server(handler) as url:
        server = _on_stand_in(url, tmp_path)
        with pytest.raises(overhead.ServerFailed) as failed:
            server.post(b"png")
    assert str(failed.value) == (f"vitc-openvino (port {server.port}): POST /v1/models/m/classify: {said} "
                                 f"(log: {tmp_path / 'vitc-openvino.log'})")
    assert failed.value.code == 1 and server.failed


def test_metrics_that_are_not_prometheus_text_or_not_there_fail_the_server_by_name(tmp_path):
    with stand_in_server(_Answers) as url:
        server = _on_stand_in(url, tmp_path)
        with pytest.raises(overhead.ServerFailed, match=r"^vitc-openvino \(port \d+\): GET /metrics: not Prometheus"):
            server.metrics()
    with pytest.raises(overhead.ServerFailed, match=r"^vitc-openvino \(port \d+\): GET /metrics: Connection refused"):
        server.metrics()  # the stand-in is gone


class _Flood(StandInHandler):
    """A stand-in that answers every request with 1 MiB past the client's bound (classify: MAX_ANSWER_BYTES, GET:
    MAX_GET_BYTES), without a Content-Length (delimited by the close, as a stream without end is), unless
    `announced` (then the Content-Length alone, nothing sent)."""

    announced = False

    def _flood(self, limit: int) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        if self.announced:
            self.send_header("Content-Length", str(limit + 1))
        self.end_headers()
        self.close_connection = True
        if self.announced:
            return
        with contextlib.suppress(OSError):  # the client stops reading past its bound and closes
            for _ in range((limit >> 20) + 1):
                self.wfile.write(b" " * (1 << 20))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.read_body()
        self._flood(loadgen.MAX_ANSWER_BYTES)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._flood(loadgen.MAX_GET_BYTES)


@pytest.mark.parametrize("announced", [False, True], ids=["streamed", "content-length"])
def test_an_oversize_answer_or_metrics_fails_the_server_by_name_unread(tmp_path, announced):
    """`post` and `metrics` read a server's answers whole: one that streams without end (a wrong port, a server gone
    wrong) filled the benchmark's memory. Each is read up to its bound, and past it the server fails by name, with
    the URL and the bound (exit 1 for the run)."""
    handler = type("H", (_Flood,), {"announced": announced})
    with stand_in_server(handler) as url:
        server = _on_stand_in(url, tmp_path)
        with pytest.raises(overhead.ServerFailed) as failed:
            server.post(b"png")
        assert str(failed.value) == (
            f"vitc-openvino (port {server.port}): POST {url}/v1/models/m/classify answered more than 4 MiB: not a "
            f"vitc server's answer (log: {tmp_path / 'vitc-openvino.log'})")
        assert failed.value.code == 1 and server.failed
        with pytest.raises(overhead.ServerFailed) as failed:
            server.metrics()
        assert str(failed.value) == (f"vitc-openvino (port {server.port}): GET {url}/metrics answered more than 64 "
                                     f"MiB: not a vitc server's answer (log: {tmp_path / 'vitc-openvino.log'})")


def test_the_hand_written_server_answering_an_error_fails_it_by_name(tmp_path_factory):
    """A real non-200: the hand-written server answers 500 to a body that is no image."""
    server = overhead.Server("naive", micro_bundle(tmp_path_factory))
    try:
        with pytest.raises(overhead.ServerFailed, match=r"^naive \(port \d+\): POST /classify: HTTP 500"):
            server.post(b"not an image")
    finally:
        server.stop()
    log = server.log
    assert log.is_file()  # kept: it holds the server's side of the story
    shutil.rmtree(log.parent)


def test_a_server_gone_at_saturation_fails_it_by_name(tmp_path_factory):
    from models.bundle import read_manifest

    bundle = micro_bundle(tmp_path_factory)
    server = overhead.Server("naive", bundle)
    try:
        server.proc.kill()
        with pytest.raises(overhead.ServerFailed, match=r"^naive \(port \d+\): saturation: no request succeeded: .*"
                                                        r"; the server was killed by SIGKILL \(log: "):
            overhead.saturation({"naive": server}, {}, read_manifest(bundle), None, bundle, b"png", concurrency=1,
                                seconds=0.2, rounds=1)
    finally:
        server.stop()
    shutil.rmtree(server.log.parent)


# --- 5. gpu_check hung up by its terminal --------------------------------------------------------------------------

def _step_processes(check_pid: int) -> list[int]:
    """Live processes of gpu_check `check_pid`'s steps (marked in their environment)."""
    mark = f"\0VITC_GPU_CHECK_STEP={check_pid}-".encode()
    return _live(lambda entry, _: mark in b"\0" + (entry / "environ").read_bytes())


def test_gpu_check_hung_up_stops_its_step_and_says_so(tmp_path):
    err_path, tmp = tmp_path / "err", tmp_path / "tmp"
    tmp.mkdir()
    with open(err_path, "wb") as err:
        check = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--smoke",
                                  "--budget", "400", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                 env={**os.environ, "TMPDIR": str(tmp)},
                                 # A terminal's check: SIGHUP as by default, even when the tests run under nohup
                                 # (whose ignored SIGHUP the check inherits, and then rightly runs on).
                                 preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        end = time.monotonic() + 120
        while not _step_processes(check.pid) and time.monotonic() < end and check.poll() is None:
            time.sleep(0.05)
        assert _step_processes(check.pid), err_path.read_text()
        os.killpg(check.pid, signal.SIGHUP)  # as a closed terminal hangs up its foreground group
        rc = check.wait(60)
        lines = err_path.read_text().strip().splitlines()
        assert rc == 143 and lines[-1] == "python -m benchmarks.gpu_check: terminated", (rc, lines[-3:])
        assert not _step_processes(check.pid)  # the step's session, which no hang-up reaches, stopped with it
        assert not list(tmp.glob("vitc-gpu-check-*"))  # its temporary directory removed
    finally:
        for pid in [check.pid, *_step_processes(check.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        check.wait()


# --- 9. a bench cache entry whose manifest cannot be read ---------------------------------------------------------

def _prepare(cache: Path) -> object:
    from benchmarks.bundles import prepare_model

    return prepare_model("micro", "vit_c_micro", cache=cache, targets=("onnx",), max_batch=2, parity_samples=8,
                         calibration_samples=8, root=cache, log=lambda _m: None)


def test_a_cache_entry_with_an_unreadable_manifest_is_exported_again(tmp_path_factory, tmp_path):
    cache = tmp_path / "cache"
    entry = cache / "vit_c_micro-random-init"
    shutil.copytree(micro_bundle(tmp_path_factory), entry)  # an entry of the cache (another model's weights: stale)
    (entry / "manifest.json").write_text("{")
    prepared = _prepare(cache)
    assert prepared.bundle == entry and prepared.manifest.model == "vit_c_micro"
    assert json.loads((entry / "manifest.json").read_text())["name"] == "vit_c_micro-random-init"
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # nothing left aside


@pytest.mark.parametrize("content", ["notes", "link"])
def test_a_directory_in_an_entrys_place_without_a_manifest_is_refused_and_kept(tmp_path, content):
    from runtimes import ExportError

    cache = tmp_path / "cache"
    entry = cache / "vit_c_micro-random-init"
    if content == "notes":
        entry.mkdir(parents=True)
        (entry / "notes.txt").write_text("mine")
        (entry / "manifest.json").mkdir()  # not a manifest file either
    else:
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "manifest.json").write_text("{")
        cache.mkdir()
        entry.symlink_to(mine)
    with pytest.raises(ExportError):
        _prepare(cache)
    if content == "notes":
        assert (entry / "notes.txt").read_text() == "mine"
    else:
        assert entry.is_symlink() and (tmp_path / "mine" / "manifest.json").read_text() == "{"
