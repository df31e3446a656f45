"""A torchrun rank whose peers never come ends with its one line only: c10d's C++ log and stack traces (about 50
lines, one trace per connection try) are held while the process group forms and dropped when it fails; kept when
it forms, and never held when the user asked for torch's log (TORCH_CPP_LOG_LEVEL, TORCH_DISTRIBUTED_DEBUG). A
MASTER_PORT where another service accepts and never answers ends the rank too (torch's handshake has no bound).
Ports: 20210-20219."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from train import distributed

REPO = Path(__file__).resolve().parents[1]
PORTS = range(20210, 20220)
USER_LOG_VARS = ("TORCH_CPP_LOG_LEVEL", "TORCH_DISTRIBUTED_DEBUG")  # the user's: torch's log is then shown
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "VITC_DIST_TIMEOUT_S", *USER_LOG_VARS)
TRAIN = ["-m", "train", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--threads", "1",
         "--device", "cpu", "--no-progress"]


def _free_ports(n: int) -> list[int]:
    """`n` ports of this file's range that nothing listens on (rank 1 must find no rank 0 there)."""
    free = []
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == n:
            return free
    pytest.skip(f"no {n} free ports in {PORTS.start}..{PORTS.stop - 1}")


def _lone_rank_1(tmp_path: Path, port: int, argv: list[str], **extra: str) -> subprocess.Popen:
    """Rank 1 of 2, started alone: rank 0's store never answers at `port`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), VITC_DIST_TIMEOUT_S="1", **extra)
    return subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@dataclass(frozen=True)
class Ended:
    """A lone rank 1 run to its end: its port, --out, exit code, stderr, seconds from its start, and the connections
    the service at its port took (0 where none listens)."""

    port: int
    out: Path
    returncode: int
    err: str
    seconds: float
    connections: int = 0


@contextlib.contextmanager
def _silent_service(port: int) -> Iterator[list[socket.socket]]:
    """A service on `port` that takes every connection and never answers; the connections it took (closed after)."""
    silent, held = socket.socket(), []
    silent.bind(("127.0.0.1", port))
    silent.listen(8)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield held
    finally:
        silent.close()
        for conn in held:
            conn.close()


def _connected(held: list[socket.socket], rank: subprocess.Popen, timeout: float) -> None:
    """Until the service holds a connection (the rank loaded its stack and waits in the rendezvous), or the rank
    ended, or `timeout` seconds passed."""
    end = time.monotonic() + timeout
    while not held and rank.poll() is None and time.monotonic() < end:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lone_ranks(tmp_path_factory) -> dict[str, Ended]:
    """The tests' lone ranks, their waits overlapped (one after the other they took 20 s, most of it loading torch
    and waiting): "silent", the report's command with a service at its port that accepts and never answers; once it
    waits there for its deadline, "quiet", the report's command (its timeout 1 s, not 5) with no rank 0 at its port,
    and "loud", only the rendezvous (no training stack to load) with the user's TORCH_CPP_LOG_LEVEL."""
    ports = dict(zip(("silent", "quiet", "loud"), _free_ports(3), strict=True))
    outs = {name: tmp_path_factory.mktemp(name) / "run" for name in ports}
    argv = {"silent": [*TRAIN, "--out", str(outs["silent"])], "quiet": [*TRAIN, "--out", str(outs["quiet"])],
            "loud": ["-c", "from train.distributed import setup; setup('cpu')"]}
    extra = {"loud": {"TORCH_CPP_LOG_LEVEL": "WARNING"}}
    with _silent_service(ports["silent"]) as held:
        began, procs, ended = {}, {}, {}
        try:
            for name, port in ports.items():
                began[name] = time.monotonic()
                procs[name] = _lone_rank_1(outs[name].parent, port, argv[name], **extra.get(name, {}))
                if name == "silent":  # the others load torch while it waits, not while it loads
                    _connected(held, procs[name], timeout=60)
            for name, proc in procs.items():
                _, err = proc.communicate(timeout=90)
                ended[name] = Ended(ports[name], outs[name], proc.returncode, err, time.monotonic() - began[name],
                                    len(held) if name == "silent" else 0)
        finally:
            for proc in procs.values():
                proc.kill()
    return ended


def test_a_rank_whose_peers_never_come_prints_its_one_line_only_unless_torchs_log_was_asked_for(lone_ranks):
    quiet, loud = lone_ranks["quiet"], lone_ranks["loud"]
    assert quiet.returncode == 1 and len(quiet.err.splitlines()) == 1, quiet.err[-3000:]
    assert quiet.err.startswith(f"python -m train (rank 1): error: the 2 ranks did not all meet at "
                                f"127.0.0.1:{quiet.port} within 1 s ("), quiet.err
    assert quiet.err.rstrip().endswith("or give a slow start longer with VITC_DIST_TIMEOUT_S")
    assert not quiet.out.exists()
    # The user's TORCH_CPP_LOG_LEVEL wins: c10d's log is shown, then the failure.
    assert loud.returncode == 1 and "[c10d] The client socket has timed out" in loud.err, loud.err[-3000:]
    assert f"DistSetupError: the 2 ranks did not all meet at 127.0.0.1:{loud.port} within 1 s" in loud.err


def test_torchs_log_is_passed_on_when_the_group_forms_and_dropped_when_it_fails(capfd, monkeypatch):
    for var in USER_LOG_VARS:
        monkeypatch.delenv(var, raising=False)
    with distributed._held_stderr():
        os.write(2, b"[W c10d] what torch said while the group formed\n")
        assert capfd.readouterr().err == ""  # held meanwhile
    assert capfd.readouterr().err == "[W c10d] what torch said while the group formed\n"

    with pytest.raises(RuntimeError), distributed._held_stderr():
        os.write(2, b"Exception raised from throwTimeoutError\nframe #0: c10::Error::Error\n")
        raise RuntimeError("The client socket has timed out")
    assert capfd.readouterr().err == ""
    os.write(2, b"after\n")  # fd 2 is the user's stderr again
    assert capfd.readouterr().err == "after\n"


@pytest.mark.parametrize("var", USER_LOG_VARS)
def test_nothing_is_held_when_the_user_asked_for_torchs_log(var, capfd, monkeypatch):
    monkeypatch.setenv(var, "INFO" if var == "TORCH_CPP_LOG_LEVEL" else "DETAIL")
    with pytest.raises(RuntimeError), distributed._held_stderr():
        os.write(2, b"[I c10d] the log asked for\n")
        assert capfd.readouterr().err == "[I c10d] the log asked for\n"  # at once, not held
        raise RuntimeError("timed out")


def test_the_signal_watchers_line_reaches_the_real_stderr_while_it_is_held(capfd, monkeypatch):
    for var in USER_LOG_VARS:
        monkeypatch.delenv(var, raising=False)
    with distributed._held_stderr():
        os.write(distributed._stderr_fd[0], b"python -m train (rank 0): terminated\n")
    assert capfd.readouterr().err == "python -m train (rank 0): terminated\n"
    assert distributed._stderr_fd[0] == 2


def test_a_master_port_that_accepts_and_never_answers_ends_the_rank_at_its_deadline(lone_ranks):
    """A service on MASTER_PORT that takes the connection and says nothing: the rank waited in torch's handshake
    for good (SIGTERM aside); now it ends at 2 x VITC_DIST_TIMEOUT_S + slack with its one line, nothing written."""
    rank = lone_ranks["silent"]
    deadline = 2 * 1 + distributed.RENDEZVOUS_SLACK_S
    assert rank.connections, "the rank never connected"
    assert rank.returncode == 1 and len(rank.err.splitlines()) == 1, rank.err[-3000:]
    assert rank.err == (f"python -m train (rank 1): error: the process group did not form at 127.0.0.1:{rank.port} "
                        f"within {deadline:g} s: what listens there does not answer as torch's rendezvous (another "
                        f"service on MASTER_PORT?)\n")
    assert deadline <= rank.seconds < 80
    assert not rank.out.exists()
