"""A hang-up (SIGHUP: the terminal or ssh session closed) stops `python -m serve` as SIGTERM does: a graceful drain
and its usual log lines once serving (exit 0), one line and exit 143 while the models load. Its default killed the
server on the spot, without a drain or a word."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fake_runtime
import pytest
from test_serve_fixtures import client_of, fake_server

from serve.launch import REPO

V2 = "/v2/models/fake/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("hangup") / "fake")


@contextmanager
def _sighup(disposition: signal.Handlers) -> Iterator[None]:
    """The servers started here inherit SIGHUP's `disposition`: the default as a terminal's run has it, even where
    the tests run under nohup (whose ignored SIGHUP they would inherit, and then rightly serve on)."""
    previous = signal.signal(signal.SIGHUP, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def _messages(log: str) -> list[str]:
    return [json.loads(line)["msg"] for line in log.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("delay", ["0", "0.5"])
def test_a_hangup_drains_the_server_as_sigterm_does(bundle, tmp_path, delay):
    with _sighup(signal.SIG_DFL), fake_server(bundle, tmp_path, "--shutdown-delay", delay) as server, \
            client_of(server) as client:
        assert client.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200
        server.proc.send_signal(signal.SIGHUP)
        try:
            code = server.proc.wait(30)
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
    messages = _messages(server.logs())
    assert code == 0, server.logs()[-2000:]
    assert "stopped" in messages and messages[-1].startswith("Finished server process"), messages[-5:]
    if delay != "0":  # the delay's line names the signal that began it
        line = next(json.loads(x) for x in server.logs().splitlines() if '"shutting down: not ready' in x)
        assert line["signal"] == "SIGHUP"


def test_a_hangup_while_the_models_load_stops_the_start(tmp_path):
    loading = tmp_path / "loading"
    env = {**fake_runtime.server_env(tmp_path), "FAKE_RUNTIME_LOADING": str(loading)}
    bundle = fake_runtime.write_bundle(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", f"fake={bundle}", "--backend", "fake",
                             "--port", "0"], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        end = time.monotonic() + 60
        while not loading.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        assert loading.exists(), "the load never started"
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "python -m serve: terminated", err


def test_under_nohup_a_hangup_leaves_the_server_serving(bundle, tmp_path):
    with _sighup(signal.SIG_IGN), fake_server(bundle, tmp_path) as server, client_of(server) as client:
        server.proc.send_signal(signal.SIGHUP)
        assert client.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200
        assert server.proc.poll() is None
