"""SIGTERM to a training's whole process group (what `timeout`, Slurm and Kubernetes send) at the moments its
DataLoaders fork their workers: the start of every epoch and every evaluation of a folder dataset.

The signal was lost there (Python ran the handler inside an at-fork hook, which discards the exception: the run
trained on and exited 0), or a worker that it reached before its own handlers were set died of it and turned the
stop into a traceback (exit 1). Each try here is a real `python -m train` on a small folder, signalled right after
the line that precedes a fork (and a few moments later): every one must end with exit 143, one line, and --out
either gone (nothing saved yet) or holding a resume.pt that loads, with no temporaries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import free_store_port
from PIL import Image

from train.outdir import RUN_LOCK
from train.state import RESUME_FILE, load_resume, own_temporary

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "VITC_DIST_TIMEOUT_S")
TERMINATED = "python -m train: terminated"

# (a stdout line's start, seconds after it): the summary line comes just before the first epoch's loader forks, an
# epoch's line just before the next epoch's; the later moments reach into the fork, the first steps and the
# evaluation's loader.
TRIGGERS = [("vit_c_micro on", 0.0), ("vit_c_micro on", 0.03), ("epoch 1/3", 0.0), ("epoch 1/3", 0.0),
            ("epoch 1/3", 0.01), ("epoch 1/3", 0.03), ("epoch 1/3", 0.08), ("epoch 2/3", 0.0),
            ("epoch 2/3", 0.02), ("epoch 2/3", 0.15)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/{train,val}/{a,b}/ of small PNGs: 4 steps of 8 per epoch, 2 evaluation batches."""
    root = tmp_path_factory.mktemp("forkterm") / "set"
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for k, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 120 * k, 30, size=(36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def _args(folder: Path, out: Path, batch: int = 8) -> list[str]:
    """A 3-epoch run of `folder` into `out` with 2 loader workers."""
    return ["--model", "vit_c_micro", "--dataset", str(folder), "--epochs", "3", "--batch-size", str(batch),
            "--eval-batch-size", "8", "--threads", "1", "--workers", "2", "--device", "cpu", "--no-progress",
            "--out", str(out)]


def _try(folder: Path, out: Path, start: str, delay: float) -> tuple[int, str, str]:
    """One run signalled (its process group) `delay` s after its stdout line starting with `start` ->
    (exit code, stderr, what it printed)."""
    argv = [sys.executable, "-m", "train", *_args(folder, out)]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"PYTHONPATH": str(REPO)}
    err_file = out.with_suffix(".err")
    with open(err_file, "w") as err:
        proc = subprocess.Popen(argv, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        said = []
        try:
            for line in proc.stdout:
                said.append(line)
                if line.startswith(start):
                    time.sleep(delay)
                    os.killpg(proc.pid, signal.SIGTERM)
                    break
            said.extend(proc.stdout)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, err_file.read_text(), "".join(said)


def _problems(out: Path, code: int, err: str) -> list[str]:
    """What is wrong with a try's outcome (nothing: exit 143, one line, --out gone or resumable, no temporaries)."""
    problems = []
    if code != 143:
        problems.append(f"exit {code}")
    if err.strip().splitlines() != [TERMINATED]:
        problems.append(f"stderr {err[-1500:]!r}")
    if out.exists():
        leftovers = [p.name for p in out.iterdir() if own_temporary(p.name) or p.name == RUN_LOCK]
        if leftovers:
            problems.append(f"temporaries {leftovers}")
        if (out / RESUME_FILE).exists():
            state = load_resume(out)
            if state is None or state["progress"]["global_step"] <= 0:
                problems.append("a resume.pt of no step")
        elif any(out.iterdir()):
            problems.append(f"--out holds {sorted(p.name for p in out.iterdir())} but no {RESUME_FILE}")
    return problems


def test_sigterm_to_the_group_while_loaders_fork_always_stops_with_143_and_one_line(folder, tmp_path):
    tries = [(tmp_path / f"run{i}", start, delay) for i, (start, delay) in enumerate(TRIGGERS)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the machine's two cores
        results = list(pool.map(lambda t: _try(folder, *t), tries))
    failed = {f"{start!r}+{delay}s: {said[-200:]!r}": problems
              for (out, start, delay), (code, err, said) in zip(tries, results, strict=True)
              if (problems := _problems(out, code, err))}
    assert not failed, f"{len(failed)} of {len(tries)} tries went wrong: {failed}"


def _free_port() -> int:
    return free_store_port(range(29528, 29530))  # this file's


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_sigterm_to_both_ranks_while_loaders_fork_stops_each_with_its_line(folder, tmp_path, delay):
    """Under DDP one rank lost the signal and trained on, the other then said "lost another rank"; or a rank
    aborted after its line ("terminate called without an active exception": the signal watcher freed the process
    group while Python shut down)."""
    port, out = _free_port(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), VITC_DIST_TIMEOUT_S="60")
    argv = [sys.executable, "-m", "train", *_args(folder, out, batch=4)]
    ranks, outs, errs = [], [tmp_path / f"out{r}" for r in (0, 1)], [tmp_path / f"err{r}" for r in (0, 1)]
    for r in (0, 1):  # files, not pipes: a process left holding one (a worker) cannot block the test's read
        with open(outs[r], "w") as stdout, open(errs[r], "w") as err:
            ranks.append(subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=tmp_path,
                                          stdout=stdout, stderr=err, start_new_session=True))
    try:
        deadline = time.monotonic() + 240
        while "epoch 1/3" not in outs[0].read_text() and time.monotonic() < deadline and ranks[0].poll() is None:
            time.sleep(0.005)
        assert ranks[0].poll() is None, f"rank 0 ended before its first epoch: {errs[0].read_text()[-2000:]}"
        time.sleep(delay)
        for rank in ranks:  # each rank's group, at once: what Slurm and timeout send
            os.killpg(rank.pid, signal.SIGTERM)
        codes = [_wait(rank, 120) for rank in ranks]
        left = [pid for rank in ranks for pid in _group(rank.pid)]
        for _ in range(100):  # the workers' parents are gone: each leaves within a few seconds
            if not left:
                break
            time.sleep(0.1)
            left = [pid for rank in ranks for pid in _group(rank.pid)]
    finally:
        tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,wchan:24,cmd"], capture_output=True, text=True).stdout
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rank.pid, signal.SIGKILL)
            rank.wait()
    assert None not in codes and not left, f"exits {codes}, processes left in the ranks' groups {left}:\n{tree}"
    said = [err.read_text() for err in errs]
    assert codes == [143, 143], said
    assert [s.splitlines() for s in said] == [[f"python -m train (rank {r}): terminated"] for r in (0, 1)], said
    assert not _problems(out, 143, TERMINATED)


def _wait(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """proc's exit code, or None where it is still running `timeout_s` later."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    listed = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout.split("\n")
    return [int(f[0]) for f in map(str.split, listed) if len(f) == 3 and int(f[1]) == pgid and "Z" not in f[2]]


# ---------------------------------------------------------------------------------------- the pieces, in-process
@pytest.fixture()
def sigterm_raises():
    """`python -m train`'s SIGTERM handler and Ctrl-C's, and its unraisable hook, for one test."""
    from models.cli import _discarded_signals_kept, _on_sigterm

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _discarded_signals_kept():
            yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_SIGNAL_AFTER_FORK: list[int] = []  # what the at-fork hook below sends this process (nothing outside one test)


def _signal_after_fork() -> None:
    for signum in _SIGNAL_AFTER_FORK:
        os.kill(os.getpid(), signum)


os.register_at_fork(after_in_parent=_signal_after_fork)


def test_a_signal_during_a_deferred_fork_is_raised_after_it_and_the_child_is_born_with_it_blocked(sigterm_raises):
    from models.cli import Terminated, deferred_signals

    read, write = os.pipe()
    _SIGNAL_AFTER_FORK.append(signal.SIGTERM)  # Python runs the handler inside the at-fork hooks: discarded there
    try:
        with pytest.raises(Terminated), deferred_signals():
            pid = os.fork()
            if pid == 0:  # the child reports whether SIGTERM is blocked in it, before anything else runs
                os.write(write, b"1" if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, ()) else b"0")
                os._exit(0)
            _SIGNAL_AFTER_FORK.clear()
            assert os.waitpid(pid, 0)[1] == 0
            assert os.read(read, 1) == b"1"
    finally:
        _SIGNAL_AFTER_FORK.clear()
        os.close(read)
        os.close(write)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, ())  # unblocked again in this thread


def test_a_sigterm_python_discards_in_a_del_is_raised_at_the_next_safe_point(sigterm_raises, capsys):
    from models.cli import Terminated, raise_discarded_signal

    class SignalledWhileCollected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in here, where its exception is discarded

    SignalledWhileCollected()
    assert "Terminated" not in capsys.readouterr().err  # kept, not printed as "Exception ignored"
    with pytest.raises(Terminated):
        raise_discarded_signal()
    raise_discarded_signal()  # once


# What a DataLoader worker runs: it starts multiprocessing's resource sharer (the thread that hands a batch's
# tensors to the main process as file descriptors), and the main process, stopped by the signal, hangs up in the
# middle of a hand-over: it resets the connection with the worker's challenge unread.
HANGUP = '''
import multiprocessing, os, socket, struct, time
from multiprocessing import resource_sharer
from train.pipeline import _leave_signals

def worker(pipe):
    _leave_signals(0)
    pipe.send(resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))._id)
    time.sleep(2)

ctx = multiprocessing.get_context("fork")
ours, theirs = ctx.Pipe()
child = ctx.Process(target=worker, args=(theirs,))
child.start()
address, _key = ours.recv()
s = socket.socket(socket.AF_UNIX)
s.connect(address)
s.recv(1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
child.join()
print("exit", child.exitcode)
'''


def test_a_worker_says_nothing_when_the_main_process_hangs_up_mid_hand_over(tmp_path):
    done = subprocess.run([sys.executable, "-c", HANGUP], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "exit 0\n", done
    assert done.stderr == "", done.stderr  # was a ConnectionResetError traceback from the resource sharer's thread


# A DataLoader worker polls the loader's shutdown event (a multiprocessing Event: a lock shared with the main
# process) between batches. A worker ended by the group's SIGTERM while it held that lock left it held for good, and
# the main process, setting the event to shut its workers down, waited forever (a rank signalled with its group hung
# after its line, holding its job's slot). The main process's own SIGTERM (`terminate()`, which multiprocessing also
# sends its children at exit, then joins them) must still end a worker: ignored, it hung a run whose other worker
# had died.
HELD_LOCK = '''
import multiprocessing, os, signal, subprocess, threading, time
from train.pipeline import _leave_signals

def worker(done):
    _leave_signals(0)
    while not done.is_set():
        pass

ctx = multiprocessing.get_context("fork")
hung = 0
for _ in range(12):
    done = ctx.Event()
    child = ctx.Process(target=worker, args=(done,))
    child.start()
    time.sleep(0.05)
    subprocess.run(["kill", "-TERM", str(child.pid)], check=True)  # another process's SIGTERM, as the group's
    time.sleep(0.02)
    setter = threading.Thread(target=done.set, daemon=True)
    setter.start()
    setter.join(5)
    hung += setter.is_alive()
    child.join(5)
    hung += child.is_alive()
    if child.is_alive():
        child.kill()
child = ctx.Process(target=worker, args=(ctx.Event(),))  # never told to stop
child.start()
time.sleep(0.3)
child.terminate()  # this process's SIGTERM
child.join(5)
print("hung", hung, "terminated", child.exitcode)
'''


def test_the_groups_sigterm_never_leaves_the_loaders_shutdown_lock_held_and_the_parents_ends_a_worker(tmp_path):
    done = subprocess.run([sys.executable, "-c", HELD_LOCK], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=150)
    assert done.stdout == "hung 0 terminated 0\n", done


def test_a_run_whose_worker_is_killed_ends_with_its_error_and_no_hang(tmp_path):
    """The OOM killer's SIGKILL to one worker: the run reports it (exit 1) and ends; multiprocessing's exit then
    terminates and joins the other worker, which must take that SIGTERM."""
    argv = [sys.executable, "-m", "train", "--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits",
            "--epochs", "2", "--batch-size", "16", "--train-subset", "1024", "--val-subset", "64", "--threads", "1",
            "--no-progress", "--workers", "2", "--out", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("vit_c_micro"):
                break
        time.sleep(1)
        _stop_then_kill_a_worker(proc.pid)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert "exited unexpectedly" in err or "killed by signal" in err, err


# A command (any `python -m`) in which a Ctrl-C or SIGTERM lands inside a __del__, where Python discards its
# exception: kept by `run`, which only training raised again, it was lost without a word (exit 0).
DISCARDED = '''
import signal, sys
from models.cli import run

class Collected:
    def __del__(self):
        if sys.argv[1] == "value":
            raise ValueError("boom in __del__")
        signal.raise_signal(signal.SIGINT if sys.argv[1] == "int" else signal.SIGTERM)

def main():
    Collected()
    print("main returned")
    return 0

run(main, "python -m demo")
'''


@pytest.mark.parametrize("kind, code, line", [("int", 130, "python -m demo: interrupted"),
                                              ("term", 143, "python -m demo: terminated")])
def test_a_signal_discarded_in_a_del_stops_any_command_as_it_returns(tmp_path, kind, code, line):
    script = tmp_path / "demo.py"
    script.write_text(DISCARDED)
    done = subprocess.run([sys.executable, str(script), kind], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert (done.returncode, done.stderr.strip()) == (code, line), done


def test_an_exception_in_a_del_that_is_no_signal_is_still_printed(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text(DISCARDED)
    done = subprocess.run([sys.executable, str(script), "value"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0 and "ValueError: boom in __del__" in done.stderr, done


def _stop_then_kill_a_worker(pid: int) -> None:
    """SIGSTOP one live data-loader worker of `pid` (the main process then waits on its batch), then SIGKILL it. A
    worker listed may be gone by the time it is signalled (an epoch's end replaces them): the next one is taken."""
    for _ in range(50):
        for worker in (int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
            try:
                if Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                    continue  # an epoch's worker that exited, not yet reaped: a signal to it "succeeds"
                os.kill(worker, signal.SIGSTOP)
                time.sleep(1.5)
                os.kill(worker, signal.SIGKILL)  # stopped, so still there unless it had already exited
            except (ProcessLookupError, FileNotFoundError):
                continue
            return
        time.sleep(0.1)
    raise AssertionError("no data-loader worker of the run could be signalled")
