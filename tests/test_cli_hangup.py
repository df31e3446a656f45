"""A hang-up (SIGHUP: the terminal or ssh session closed) stops every `models.cli.run` command as SIGTERM does: one
line, exit 143, its cleanup run (locks, temporary directories, started servers); under nohup it runs on. Its default
killed the command without a word (exit 129), leaving `.OUT.lock`, `.OUT.*.tmp` and orphaned servers behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_serve_fixtures import micro_bundle, micro_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
WAIT_S = 120.0


def _terminal_default() -> None:
    """A terminal's run: SIGHUP as by default, even when the tests run under nohup (whose ignored SIGHUP the command
    would inherit, and then rightly run on)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _await(ready, proc: subprocess.Popen) -> None:  # noqa: ANN001 - a predicate
    end = time.monotonic() + WAIT_S
    while not ready() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    assert ready(), f"never ready (exit {proc.poll()})"


def _children(pid: int) -> list[int]:
    """The live child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def _servers(pid: int) -> list[int]:
    """The child processes of `pid` that are servers (`python -m serve`, the hand-written one): the benchmark starts
    short-lived others first (its machine facts, git), which ended by the time a wait on any child looked again."""
    def serving(child: int) -> bool:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"serve" in argv or any(b"naive_server" in a for a in argv)
    return [child for child in _children(pid) if serving(child)]


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie is not: it has ended, only its parent has not reaped it)."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return False
    return [pid for pid in pids if running(pid)]


def _stop(proc: subprocess.Popen, pids: list[int]) -> None:
    """SIGKILL `proc` and those of its children `pids` still running: nothing a failed test started outlives it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in _alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# `signals_caught` around a child's start where SIGHUP's handler is the default: the hang-up it held was
# re-delivered to that default on leaving, which ended the process on the spot (the child recorded, then orphaned).
CAUGHT = textwrap.dedent("""
    import os, signal
    from models.cli import Terminated, signals_caught
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with signals_caught():
            os.kill(os.getpid(), signal.SIGHUP)
            print("held", flush=True)
    except Terminated:
        print("terminated", flush=True)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: ignored inside too, so that a child started there inherits it
    with signals_caught():
        print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
""")


def test_a_hangup_held_around_a_childs_start_takes_sigterms_path():
    done = subprocess.run([sys.executable, "-c", CAUGHT], env=ENV, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["held", "terminated", "True"], "")


# A command whose main holds a lock-like file until its cleanup, and a child in a session of its own (which no
# hang-up reaches), for argv[2] seconds: the child's pid is printed once both are there.
COMMAND = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from models.cli import run

    def main():
        lock = Path(sys.argv[1])
        lock.touch()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        try:
            print(child.pid, flush=True)
            time.sleep(float(sys.argv[2]))
        finally:
            child.kill()
            child.wait()
            lock.unlink()
        return 0

    run(main, "probe")
""")


def test_a_hangup_stops_any_command_as_sigterm_does(tmp_path):
    lock = tmp_path / ".out.lock"
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, str(lock), "300"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_terminal_default)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (143, "probe: terminated\n")
        assert not lock.exists() and not _alive([child])
    finally:
        _stop(proc, [child])


def test_under_nohup_a_command_runs_on(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, str(tmp_path / ".out.lock"), "1"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.stdout.readline()
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")


def test_a_hungup_export_leaves_no_lock_or_temporary(tmp_path):
    checkpoint = micro_checkpoint(tmp_path)
    out = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out", str(out),
                             "--targets", "onnx,openvino", "--max-batch", "4", "--parity-samples", "16"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_terminal_default)
    try:
        _await(lambda: list(tmp_path.glob(".exp.*.tmp/.scratch")), proc)  # building: the lock is held
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "python -m export: terminated", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .exp.lock, no .exp.*.tmp, no exp


def test_a_hungup_overhead_benchmark_stops_its_server(tmp_path, tmp_path_factory):
    bundle = micro_bundle(tmp_path_factory)
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.overhead", "--bundle", str(bundle), "--rounds", "1",
                             "--slice", "0.3", "--saturation", "1", "--saturation-rounds", "1", "--cold-starts", "1",
                             "--out", str(tmp_path / "out")],
                            cwd=ROOT, env={**ENV, "TMPDIR": str(temp)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_terminal_default)
    servers: list[int] = []
    try:
        _await(lambda: servers.extend(_servers(proc.pid)) or servers, proc)  # its first server started
        proc.send_signal(signal.SIGHUP)  # to the benchmark alone: its server is left to it to stop
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, (proc.returncode, err)
        assert err.strip().splitlines()[-1] == "python -m benchmarks.overhead: terminated", err
        assert not _alive(servers)  # stopped, not orphaned
        assert list(temp.iterdir()) == []  # its temporary log directory removed
    finally:  # its children as they are now too: a failure before a server was seen must not orphan one
        _stop(proc, servers + (_children(proc.pid) if proc.poll() is None else []))
