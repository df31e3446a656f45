"""`benchmarks/latency.py --http start --port N` puts the server it starts on port N, as `benchmarks.load --start
--port N` does; `--server-args='--port N'` still does the same; the two together, and --port for anything but a
started server, are one line and exit 2 before a server starts. Fast: the server start is a stand-in."""

from __future__ import annotations

import pytest

import serve.launch
from benchmarks.latency import main


class Started(Exception):
    """The stand-in server start was reached."""


@pytest.fixture
def started(monkeypatch) -> list[list[str]]:
    """The `python -m serve` arguments each server start got (the start itself is not made)."""
    calls: list[list[str]] = []

    def start(args, log_path, env=None, **_kw):
        calls.append(list(args))
        raise Started

    monkeypatch.setattr(serve.launch, "start", start)
    return calls


def _port_of(args: list[str]) -> str:
    """The port `python -m serve` takes from these arguments: the last --port wins (launch puts --port 0 first)."""
    return [args[i + 1] for i, a in enumerate(args) if a == "--port"][-1]


def _argv(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "bundle").mkdir(exist_ok=True)
    return ["--http", "start", "--bundle", str(tmp_path / "bundle"), "--quick", "--no-plots", "--out",
            str(tmp_path / "out"), *extra]


def test_port_puts_the_started_server_on_that_port(tmp_path, started):
    with pytest.raises(Started):
        main(_argv(tmp_path, "--port", "8123", "--server-args=--device cpu"))
    assert _port_of(started[0]) == "8123"
    assert started[0][started[0].index("--device") + 1] == "cpu"  # the other server flags still reach it


def test_server_args_port_still_works(tmp_path, started):
    with pytest.raises(Started):
        main(_argv(tmp_path, "--server-args=--port 8124"))
    assert _port_of(started[0]) == "8124"


@pytest.mark.parametrize("argv, message", [
    (["--http", "start", "--port", "8123", "--server-args=--port 9000"],
     "--port and --server-args='--port ...' both set the started server's port: give one of them"),
    (["--http", "start", "--port", "8123", "--server-args=--device cpu --port=9000"],
     "--port and --server-args='--port ...' both set the started server's port: give one of them"),
    (["--http", "start", "--port", "8123", "--server-args=--por 9000"],  # serve's parser takes the abbreviation
     "--port and --server-args='--port ...' both set the started server's port: give one of them"),
    (["--http", "http://127.0.0.1:9", "--port", "8123"],
     "--port applies to --http start only (the server it starts); give a running server's port in its URL"),
    (["--port", "8123"], "--bundle, --port apply to the end-to-end mode only: add --http URL"),
    (["--http", "start", "--port", "0"], "argument --port: must be in 1..65535, got 0"),
    (["--http", "start", "--port", "65536"], "argument --port: must be in 1..65535, got 65536"),
])
def test_port_refusals_are_one_line_and_exit_2_before_any_start(argv, message, tmp_path, started, capsys):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python benchmarks/latency.py: error: {message}"), err
    assert started == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
