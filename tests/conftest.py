"""Shared pytest fixtures. Training's are named train_*."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

import pytest

# A shell without job control starts `pytest &` (and nohup) with SIGINT ignored, and every child inherits that: the
# CLIs rightly keep an ignored SIGINT ignored, so the tests of Ctrl-C would see nothing. Take it back for this run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _preserved_process_state() -> Iterator[None]:
    """The training CLIs set OMP_WAIT_POLICY and torch's thread count; undo both for the rest of the session."""
    import torch

    env, threads = os.environ.get("OMP_WAIT_POLICY"), torch.get_num_threads()
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = env
        torch.set_num_threads(threads)


def train_run_cli(fn: Callable[[list[str]], int], argv: list[str], capsys=None) -> tuple[int, str, str]:
    """Run a CLI `main(argv)` in-process -> (exit code, stdout, stderr); argparse's exits count as codes.

    Pinned to the CPU unless argv names a device: these tests are not about the GPU, and on a GPU machine
    `--device auto` would take it (and lose bit-exactness to TF32, bf16 and cuDNN autotuning)."""
    if "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    with _preserved_process_state():
        try:
            code = fn(argv)
        except SystemExit as exc:
            code = exc.code
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


@pytest.fixture(scope="session")
def train_cli() -> Callable[..., tuple[int, str, str]]:
    """`train_cli(main, argv, capsys)`: a training CLI run in-process, process state restored afterwards."""
    return train_run_cli


# The smallest real run: 64 digits in 4 steps of 16, one thread; tests add --max-steps, --out and their own flags.
TRAIN_TINY = ("--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--batch-size",
              "16", "--train-subset", "64", "--val-subset", "16", "--threads", "1", "--no-progress")


@pytest.fixture(scope="session")
def train_tiny() -> list[str]:
    """TRAIN_TINY's arguments (a fresh list: tests extend it)."""
    return list(TRAIN_TINY)


@pytest.fixture(scope="session")
def train_stopped(tmp_path_factory) -> Callable[[int], object]:
    """`train_stopped(steps)`: a TRAIN_TINY run stopped mid-epoch by --max-steps (one per step count, shared:
    copy it before changing anything)."""
    from train.__main__ import main

    runs: dict = {}

    def stopped(steps: int):
        if steps not in runs:
            run = tmp_path_factory.mktemp(f"stopped{steps}") / "run"
            code, _, err = train_run_cli(main, [*TRAIN_TINY, "--max-steps", str(steps), "--out", str(run)])
            assert code == 0, err
            runs[steps] = run
        return runs[steps]

    return stopped


@pytest.fixture(scope="session")
def micro_checkpoint() -> Callable[[object], object]:
    """`micro_checkpoint(dir)`: a seeded, untrained vit_c_micro at 32 px for the animals classes, saved in dir/ckpt
    (its head drawn wide, so classes differ): what a runtime's export and parity gate are tested on."""
    def save(where):
        import torch

        from data.datasets import ANIMAL_CLASSES, default_preprocessing
        from models import build_model
        from models.checkpoint import save_checkpoint

        torch.manual_seed(0)
        model = build_model("vit_c_micro").eval()
        with torch.no_grad():
            model.head.weight.normal_(0, 0.5)
        return save_checkpoint(where / "ckpt", model, class_names=ANIMAL_CLASSES,
                               preprocessing=default_preprocessing("animals", 32), extra={"dataset": "animals"})

    return save


@pytest.fixture()
def mounts(monkeypatch) -> set[str]:
    """Directories to be taken for mount points (add their paths): os.path.ismount says so for them."""
    fake: set[str] = set()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) in fake or real(p))
    return fake


@pytest.fixture()
def fake() -> Iterator[None]:
    """The fake runtime (tests/fake_runtime.py) registered for one test."""
    import fake_runtime

    with fake_runtime.registered():
        yield


@pytest.fixture()
def repo(tmp_path) -> object:
    """A repository of the fake runtime: model "fake", version 1, and its config.pbtxt (test_repository_lifecycle's)."""
    from test_repository_lifecycle import CONFIG, NAME, add_version

    root = tmp_path / "repo"
    add_version(root, NAME, "1")
    (root / NAME / "config.pbtxt").write_text(CONFIG)
    return root


def free_store_port(ports: range) -> int:
    """A port of `ports` that torch's rendezvous store could bind now (as it binds: SO_REUSEADDR, so a closed one's in
    TIME_WAIT is free); skips the test when none is."""
    import socket

    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    pytest.skip(f"no free port in {ports.start}..{ports.stop - 1}")



def listening(port: int) -> bool:
    """Whether a socket listens on `port` (the rank-0 store: its rank is then inside the rendezvous)."""
    from pathlib import Path

    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(int(r.split()[1].rsplit(":", 1)[1], 16) == port and r.split()[3] == "0A" for r in rows):
            return True
    return False


def wait_for(condition: Callable[[], bool], what: str, procs: list, limit: float = 120) -> None:
    """Until `condition()` holds; fails (killing `procs`, showing their stderr) when one of them exits first or
    `limit` seconds pass."""
    import time

    deadline = time.monotonic() + limit
    while not condition():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            said = "\n".join(f"rank {i} ({p.wait()}): {p.communicate()[1][-2000:]}" for i, p in enumerate(procs))
            pytest.fail(f"no {what} within {limit} s, or a rank exited first:\n{said}")
        time.sleep(0.1)
