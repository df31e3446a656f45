"""DDP: `torchrun --nproc_per_node 2 -m train` on the CPU (gloo) ends with identical ranks and only rank 0 writes;
`torchrun --nproc_per_node 1` joins a real process group of one (gloo on the CPU, NCCL on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from train.distributed import state_digest

REPO = Path(__file__).resolve().parents[1]

# Loaded into every rank through PYTHONPATH: a Python audit hook that logs each file-system write under the run
# directory, per rank. Rank 0's log shows the hook sees the writes; rank 1's must be empty.
SITECUSTOMIZE = '''
import os, sys
_dir = os.environ.get("VITC_AUDIT_DIR")
if _dir:
    _watched = os.path.realpath(_dir)
    _fd = os.open(os.path.join(os.environ["VITC_AUDIT_LOG"], f"rank{os.environ.get('RANK', 'x')}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _busy = []
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _hook(event, args):
        if _busy or event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "tempfile.mkstemp",
                                  "shutil.rmtree", "os.truncate"):
            return
        _busy.append(1)
        try:
            path = args[0]
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.realpath(os.fsdecode(path))
                writes = event != "open" or (args[1] and any(c in args[1] for c in "wax+")) or (
                    args[1] is None and (args[2] or 0) & _WRITE)
                if writes and path.startswith(_watched):
                    os.write(_fd, f"{event} {path}\\n".encode())
        finally:
            _busy.clear()
    sys.addaudithook(_hook)
'''


# The shared uninterrupted run: 2 ranks x 16 over 128 digits, 4 steps an epoch for 2 epochs, mixing on (every
# source of randomness that a resume must restore); one thread a rank, so a resumed run can match it bit for bit.
TWO_RANKS = ["--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "2", "--batch-size", "16",
             "--train-subset", "128", "--val-subset", "32", "--mixup", "0.8", "--cutmix", "1.0", "--threads", "1"]


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of `torchrun --standalone --nproc_per_node nproc -m train args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
            "train", *args]


@dataclass(frozen=True)
class AuditedRun:
    """A finished run, the per-rank logs of its writes under `out` (SITECUSTOMIZE), and its process."""

    out: Path
    logs: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> AuditedRun:
    """TWO_RANKS run once under torchrun with the write audit, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("two_ranks")
    hook_dir, logs, out = base / "hook", base / "logs", base / "run"
    hook_dir.mkdir()
    logs.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO)]),
           "VITC_AUDIT_DIR": str(out), "VITC_AUDIT_LOG": str(logs)}
    proc = subprocess.run(torchrun(2, *TWO_RANKS, "--out", str(out)), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    return AuditedRun(out, logs, proc)


def test_torchrun_two_cpu_ranks_identical_and_only_rank0_writes(two_rank_run):
    out, logs, proc = two_rank_run.out, two_rank_run.logs, two_rank_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "checkpoint.json").read_text())["training"]
    assert summary["world_size"] == 2 and summary["global_batch"] == 32 and summary["steps"] == 2 * (128 // 32)
    assert summary["ddp_backend"] == "gloo"
    digests = summary["rank_state_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # The digest is of rank 0's final raw weights and BN statistics, which resume.pt holds too.
    model = torch.load(out / "resume.pt", weights_only=True)["model"]
    assert state_digest(_StateOnly(model)) == digests[0]

    rank0 = (logs / "rank0.log").read_text()
    assert "checkpoint.json" in rank0 and "metrics.jsonl" in rank0 and "resume.pt" in rank0
    assert (logs / "rank1.log").read_text() == ""
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one writer, one line per epoch
    assert proc.stdout.count("checkpoint ") == 1 and proc.stdout.count("epoch 2/2") == 1


@pytest.mark.parametrize("device, backend", [
    ("cpu", "gloo"),
    pytest.param("cuda", "nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")]),
])
def test_torchrun_one_rank_runs_a_real_process_group(device, backend, tmp_path):
    # One process under torchrun still joins a process group, so a one-GPU machine runs the NCCL/DDP path.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "train",
           "--device", device, "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--batch-size", "16",
           "--train-subset", "64", "--max-steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "checkpoint.json").read_text())["training"]
    assert summary["ddp_backend"] == backend and summary["world_size"] == 1 and summary["steps"] == 2
    assert "x 1 ranks" in proc.stdout + proc.stderr


class _StateOnly(torch.nn.Module):
    """A module whose state_dict is a given mapping (to hash a saved state like a live model)."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs) -> dict:
        return self._state


def image_folder(root: Path, per_class: int = 6) -> Path:
    """root/{train,val}/{a,b}/ with per_class random 36x36 PNGs each: a dataset that needs no sklearn (digits does,
    a second of every rank's start); returns root."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.random.default_rng(i).integers(0, 255, (36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_torchrun_a_corrupt_file_met_by_rank_1_is_named_by_it_and_rank_0_says_it_lost_it(tmp_path):
    from data.datasets import load_dataset
    from train.pipeline import EpochBatches

    image_folder(tmp_path / "ds")
    broken = tmp_path / "ds" / "train" / "a" / "broken.png"
    broken.write_bytes(b"")
    train = load_dataset(tmp_path / "ds", "train")
    n, at = len(train), train.paths.index(broken)

    def first_batch(rank: int, seed: int) -> list[int]:
        return [i for _, i in next(iter(EpochBatches(n, 2, rank, 2, seed, 0)))]

    # A seed whose first step gives the corrupt file to rank 1 only: rank 0 never meets it.
    seed = next(s for s in range(100) if at in first_batch(1, s) and not {at, at + 1} & set(first_batch(0, s)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           "--device", "cpu", "--model", "vit_c_micro", "--dataset", str(tmp_path / "ds"), "--epochs", "1",
           "--batch-size", "2", "--threads", "1", "--workers", "0", "--corrupt", "fail", "--seed", str(seed),
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("python -m train")]
    assert f"python -m train (rank 1): error: corrupt or unreadable image: {broken}" in proc.stderr, proc.stderr
    assert any(line.startswith("python -m train (rank 0): error: lost another rank (") for line in ours), ours
    assert len(ours) == 2 and "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr


def test_resuming_under_another_number_of_processes_is_refused_when_the_global_batch_changes(tmp_path):
    """2 ranks x 4 and 3 ranks x 4 over 12 images both make one step per epoch: the resume was accepted and trained
    on batches of 12 after batches of 8, with the old schedule, recording neither."""
    out = tmp_path / "run"

    def run(n: int, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
               "train", "--out", str(out), "--threads", "1", "--no-progress", *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)

    data = image_folder(tmp_path / "ds")
    first = run(2, "--device", "cpu", "--model", "vit_p_micro", "--dataset", str(data), "--train-subset", "12",
                "--val-subset", "8", "--epochs", "4", "--max-steps", "2", "--batch-size", "4", "--workers", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(3, "--resume", "--max-steps", "0")
    assert again.returncode != 0
    assert "written with a global batch of 8 (2 process(es)), this run has 12 (3)" in again.stderr, again.stderr[-3000:]


def test_the_readme_says_a_run_resumes_under_no_other_number_of_processes_in_the_words_it_is_refused():
    """README said nothing of it: a 2-rank run resumed on 1 process is refused, and so is the --batch-size that
    would keep its global batch."""
    from train.config import ConfigError, config_from_options, resolve_config
    from train.trainer import other_world_text

    run = config_from_options({"model": "vit_c_micro", "dataset": "digits", "out": "r", "batch_size": 16})
    with pytest.raises(ConfigError) as kept_global:
        resolve_config({"batch_size": 32}, run.to_dict())
    readme = " ".join((REPO / "README.md").read_text().split())
    for refusal in (other_world_text(32, 2, 16, 1), str(kept_global.value)):
        assert f"`{refusal}`" in readme, refusal


def test_an_epoch_resumed_mid_way_under_torchrun_records_the_loss_of_an_uninterrupted_one(two_rank_run, tmp_path):
    """resume.pt kept rank 0's running sums of the epoch and every rank restored them: the resumed epoch's loss
    counted rank 0's first part twice and rank 1's not at all (the weights were right, the record was not)."""
    assert two_rank_run.proc.returncode == 0, two_rank_run.proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> None:
        proc = subprocess.run(torchrun(2, *TWO_RANKS, *args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]

    split = tmp_path / "split"
    run("--out", str(split), "--max-steps", "6")  # 4 steps an epoch: stops half-way through epoch 2
    run("--out", str(split), "--resume", "--max-steps", "0")

    def epochs(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    whole, resumed = epochs(two_rank_run.out), epochs(split)
    assert [e["epoch"] for e in resumed] == [1, 2] and resumed[1]["complete"]
    for a, b in zip(whole, resumed, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9), (a, b)
        assert b["corrupt_train_replaced"] == a["corrupt_train_replaced"]


def test_a_dataset_every_rank_fails_to_load_is_said_once_and_whole(tmp_path):
    """Each rank printed it, text and newline in two writes to the shared (unbuffered) stderr: lines came spliced."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           "--device", "cpu", "--model", "vit_c_micro", "--dataset", str(tmp_path / "nope"), "--out",
           str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("python -m train")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert ours[0] == (f"python -m train (rank 0): error: unknown dataset {str(tmp_path / 'nope')!r}: not one of "
                       "animals, mnist, digits and not a directory"), ours
