"""torchrun's variables are checked up front: a partial or malformed set (WORLD_SIZE alone, WORLD_SIZE=abc/0/-1,
RANK=x, a RANK outside the world, LOCAL_WORLD_SIZE=abc, a bad LOCAL_RANK) is one line naming the variable and
torchrun, exit 2, before any data or model work; it gave tracebacks, or trained with a negative learning rate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.__main__ import main as train_main
from train.config import ConfigError
from train.distributed import DEFAULT_TIMEOUT_S, DistEnv, dist_env

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "VITC_DIST_TIMEOUT_S")
RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "20110"}

BAD = [
    # (environment, the variable the line names, a phrase of it)
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE", "WORLD_SIZE=2 without RANK, MASTER_ADDR and MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE", "WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE", "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE", "WORLD_SIZE=0 must be at least 1"),
    ({"WORLD_SIZE": "-1"}, "WORLD_SIZE", "WORLD_SIZE='-1' is not a whole number"),
    ({"RANK": "x"}, "RANK", "RANK='x' is not a whole number"),
    ({"RANK": "1"}, "RANK", "RANK='1' without WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "2", **RENDEZVOUS}, "RANK", "RANK=2 must be in 0..1 (WORLD_SIZE=2)"),
    ({"WORLD_SIZE": "2", "RANK": "-1", **RENDEZVOUS}, "RANK", "RANK='-1' is not a whole number"),
    ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK", "RANK=1 must be in 0..0 (WORLD_SIZE=1)"),
    ({"LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE", "LOCAL_WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "3", **RENDEZVOUS}, "LOCAL_WORLD_SIZE",
     "LOCAL_WORLD_SIZE=3 must be in 1..2 (WORLD_SIZE=2)"),
    ({"LOCAL_RANK": "y"}, "LOCAL_RANK", "LOCAL_RANK='y' is not a whole number"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS}, "LOCAL_RANK",
     "LOCAL_RANK=2 must be in 0..1 (LOCAL_WORLD_SIZE=2)"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT",
     "MASTER_PORT='http' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": " ", "MASTER_PORT": "20110"}, "MASTER_ADDR",
     "MASTER_ADDR is empty"),
    ({"VITC_DIST_TIMEOUT_S": "0"}, "VITC_DIST_TIMEOUT_S", "VITC_DIST_TIMEOUT_S='0': expected seconds in 1..86400"),
    ({"VITC_DIST_TIMEOUT_S": "nan"}, "VITC_DIST_TIMEOUT_S", "VITC_DIST_TIMEOUT_S='nan'"),
]


@pytest.fixture
def no_dist_env(monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, var, phrase", BAD, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _, _ in BAD])
def test_bad_distributed_environment_is_one_line_naming_the_variable_exit_2_before_any_work(
        env, var, phrase, no_dist_env, tmp_path, capsys, train_cli):
    no_dist_env.setenv("VITC_DIST_TIMEOUT_S", "3")  # a regression that starts a rendezvous fails, not hangs
    for k, v in env.items():
        no_dist_env.setenv(k, v)
    out = tmp_path / "run"
    code, _, err = train_cli(train_main, ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1",
                                          "--out", str(out)], capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"python -m train: error: {phrase}"), lines[0]
    assert var in lines[0] and ("torchrun" in lines[0] or var == "VITC_DIST_TIMEOUT_S"), lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())  # refused before the run directory or its lock


@pytest.mark.parametrize("env, var, phrase", BAD[:6])
def test_dist_env_raises_config_error_for_a_bad_world(env, var, phrase):
    with pytest.raises(ConfigError, match=var):
        dist_env(env)


def test_dist_env_reads_what_torchrun_sets_and_one_process_without_it():
    assert dist_env({}) == DistEnv(0, 1, 0, 1, False, DEFAULT_TIMEOUT_S)
    # Stray but consistent: still one process, as before.
    assert dist_env({"WORLD_SIZE": "1"}) == DistEnv(0, 1, 0, 1, False, DEFAULT_TIMEOUT_S)
    assert dist_env({"RANK": "0"}) == DistEnv(0, 1, 0, 1, False, DEFAULT_TIMEOUT_S)
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", **RENDEZVOUS}
    assert dist_env(torchrun) == DistEnv(5, 8, 1, 4, True, DEFAULT_TIMEOUT_S)
    # A process group of one (torchrun --nproc_per_node 1), with a longer wait for the others asked for.
    one = {"RANK": "0", "WORLD_SIZE": "1", **RENDEZVOUS, "VITC_DIST_TIMEOUT_S": "1800"}
    assert dist_env(one) == DistEnv(0, 1, 0, 1, True, 1800.0)


def test_a_malformed_world_size_and_rank_are_one_line_from_the_command_itself(tmp_path):
    """The rank prefix of every line was computed from them before main ran: a traceback, exit 1."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), WORLD_SIZE="abc", RANK="x")
    proc = subprocess.run([sys.executable, "-m", "train", "--model", "vit_c_micro", "--dataset", "digits",
                           "--out", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "python -m train: error: WORLD_SIZE='abc' is not a whole number: launch the ranks with torchrun (torchrun "
        "--nproc_per_node N -m train ...), which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR "
        "and MASTER_PORT, or unset them to train in one process"], proc.stderr
    assert not (tmp_path / "run").exists()
