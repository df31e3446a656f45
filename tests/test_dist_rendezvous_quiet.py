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


def test_a_rank_whose_peers_never_come_prints_its_one_line_only_unless_torchs_log_was_asked_for(tmp_path):
    quiet_port, loud_port = _free_ports(2)
    # The report's command (its timeout 1 s, not 5), and beside it only the rendezvous (no training stack to load)
    # with the user's TORCH_CPP_LOG_LEVEL: both wait out c10d's two connection tries at once.
    quiet = _lone_rank_1(tmp_path, quiet_port, [*TRAIN, "--out", str(tmp_path / "run")])
    loud = _lone_rank_1(tmp_path, loud_port, ["-c", "from train.distributed import setup; setup('cpu')"],
                        TORCH_CPP_LOG_LEVEL="WARNING")
    try:
        _, quiet_err = quiet.communicate(timeout=60)
        _, loud_err = loud.communicate(timeout=60)
    finally:
        for p in (quiet, loud):
            p.kill()
    assert quiet.returncode == 1 and len(quiet_err.splitlines()) == 1, quiet_err[-3000:]
    assert quiet_err.startswith(f"python -m train (rank 1): error: the 2 ranks did not all meet at "
                                f"127.0.0.1:{quiet_port} within 1 s ("), quiet_err
    assert quiet_err.rstrip().endswith("or give a slow start longer with VITC_DIST_TIMEOUT_S")
    assert not (tmp_path / "run").exists()
    # The user's TORCH_CPP_LOG_LEVEL wins: c10d's log is shown, then the failure.
    assert loud.returncode == 1 and "[c10d] The client socket has timed out" in loud_err, loud_err[-3000:]
    assert f"DistSetupError: the 2 ranks did not all meet at 127.0.0.1:{loud_port} within 1 s" in loud_err


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


def test_a_master_port_that_accepts_and_never_answers_ends_the_rank_at_its_deadline(tmp_path):
    """A service on MASTER_PORT that takes the connection and says nothing: the rank waited in torch's handshake
    for good (SIGTERM aside); now it ends at 2 x VITC_DIST_TIMEOUT_S + slack with its one line, nothing written."""
    (port,) = _free_ports(1)
    silent, held = socket.socket(), []
    silent.bind(("127.0.0.1", port))
    silent.listen(8)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    began = time.monotonic()
    rank = _lone_rank_1(tmp_path, port, [*TRAIN, "--out", str(tmp_path / "run")])
    try:
        _, err = rank.communicate(timeout=90)
    finally:
        rank.kill()
        silent.close()
        for conn in held:
            conn.close()
    deadline = 2 * 1 + distributed.RENDEZVOUS_SLACK_S
    assert held, "the rank never connected"
    assert rank.returncode == 1 and len(err.splitlines()) == 1, err[-3000:]
    assert err == (f"python -m train (rank 1): error: the process group did not form at 127.0.0.1:{port} within "
                   f"{deadline:g} s: what listens there does not answer as torch's rendezvous (another service on "
                   f"MASTER_PORT?)\n")
    assert deadline <= time.monotonic() - began < 80
    assert not (tmp_path / "run").exists()
