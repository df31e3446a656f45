"""Shared pytest fixtures. Training's are named train_*."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest


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
