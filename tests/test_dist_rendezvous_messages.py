"""What a rank says when the rendezvous variables set by hand are wrong: a MASTER_ADDR that does not resolve (or has
white space around it, which torch looked up as it was) is refused up front, naming it (exit 2), where it waited the
whole timeout and said "start every rank" to a group of one; rank 0, which hosts the store on MASTER_PORT, blames
ranks that did not arrive or disagree on WORLD_SIZE for a stalled rendezvous, not "another service" on its own port;
a rank whose rendezvous connection closed says who went away, not torch's "Failed to recv" text, and a wait is said
as long as torch applied it. Ports: 29520-29527."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_store_port, listening, wait_for

from train.distributed import DistEnv, _setup_failure

REPO = Path(__file__).resolve().parents[1]
PORTS = range(29520, 29528)
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "VITC_DIST_TIMEOUT_S", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_CPP_LOG_LEVEL", "TORCH_DISTRIBUTED_DEBUG")
TRAIN = ["-m", "train", "--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--threads", "1",
         "--train-subset", "128", "--batch-size", "16", "--device", "cpu", "--no-progress"]
# `python -m train` that loads its stack (torch: the most of its start, tens of seconds on a loaded machine) before
# a line on stdin lets it go on: so started, a rank reaches the rendezvous within moments of being let go.
GATED = """
import runpy, sys
import train.trainer
sys.stdin.readline()
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    return free_store_port(PORTS)


def _rank(tmp_path: Path, world: int, rank: int, addr: str, port: int, timeout_s: int = 2,
          gated: bool = False) -> subprocess.Popen:
    """`python -m train` as rank `rank` of `world`; `gated`: it loads its stack, then waits for a line on stdin."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR=addr, MASTER_PORT=str(port),
               VITC_DIST_TIMEOUT_S=str(timeout_s))
    argv = ["-c", GATED, *TRAIN[2:]] if gated else TRAIN
    return subprocess.Popen([sys.executable, *argv, "--out", str(tmp_path / "run")], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE if gated else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("addr, said", [
    ("no-such-host.invalid", "MASTER_ADDR='no-such-host.invalid' does not resolve ("),
    ("localhost ", "MASTER_ADDR='localhost ' has white space around it: give the address alone"),
])
def test_a_master_addr_that_cannot_be_looked_up_is_refused_up_front_naming_it(tmp_path, addr, said):
    port = _free_port()
    start = time.monotonic()
    proc = _rank(tmp_path, 1, 0, addr, port)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m train: error: {said}"), err
    assert "start every rank" not in err and "did not all meet" not in err
    assert time.monotonic() - start < 60  # not the rendezvous timeout's wait (it took 2 s of the timeout and more)
    assert not (tmp_path / "run").exists()


# A rendezvous that outlives its deadline, as rank RANK of WORLD_SIZE sees it (VITC_DIST_TIMEOUT_S=1: 7 s).
STALLED = """
import os, time
from train.distributed import _rendezvous_deadline, dist_env, watch_signals
watch_signals(f"rank {os.environ['RANK']}")
with _rendezvous_deadline(dist_env()):
    time.sleep(60)
"""


@pytest.mark.parametrize("rank, agent, why", [
    (0, False, "this rank hosts the rendezvous there: the other ranks did not all arrive, or they disagree on "
               "WORLD_SIZE (this rank's is 2)"),
    (1, False, "what listens there does not answer as torch's rendezvous (another service on MASTER_PORT?)"),
    (0, True, "what listens there does not answer as torch's rendezvous (another service on MASTER_PORT?)"),
], ids=["rank-0-hosts", "rank-1", "rank-0-under-torchruns-agent"])
def test_a_stalled_rendezvous_blames_another_service_only_where_this_rank_does_not_host_it(tmp_path, rank, agent,
                                                                                          why):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29520",
               VITC_DIST_TIMEOUT_S="1", **({"TORCHELASTIC_USE_AGENT_STORE": "True"} if agent else {}))
    done = subprocess.run([sys.executable, "-c", STALLED], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"rank {rank}: error: the process group did not form at 127.0.0.1:29520 within 7 s: {why}"], done.stderr


def test_ranks_that_disagree_on_world_size_never_make_rank_0_blame_another_service(tmp_path):
    """Rank 0 of 2 and rank 1 of 3: rank 1 joins rank 0's store, then waits for a rank 2 that never comes and gives
    up first (its timeout is the shorter); rank 0, hosting the store, then stalls in the rendezvous (its deadline's
    line), or loses rank 1 or waits for it in vain in its first collective, but never blames another service.
    Rank 1 loads torch before rank 0 listens and is let go once it does: a rank 1 still loading when rank 0's wait
    for it ended (the test's old 0.5 s head start) left rank 0 to say that the ranks did not all meet."""
    port = _free_port()
    rank0 = _rank(tmp_path, 2, 0, "127.0.0.1", port, timeout_s=8)
    rank1 = _rank(tmp_path, 3, 1, "127.0.0.1", port, timeout_s=2, gated=True)
    try:
        wait_for(lambda: listening(port), "rank 0's store", [rank0, rank1], limit=300)
        _, err1 = rank1.communicate("go\n", timeout=300)
        _, err0 = rank0.communicate(timeout=300)
    finally:
        for proc in (rank0, rank1):
            proc.kill()
    assert rank0.returncode == 1 and rank1.returncode == 1, (err0, err1)
    lines0 = err0.splitlines()
    assert len(lines0) == 1 and "another service" not in err0, err0
    said0 = lines0[0].removeprefix("python -m train (rank 0): error: ")
    assert said0 in (
        f"the process group did not form at 127.0.0.1:{port} within 21 s: this rank hosts the rendezvous there: the "
        "other ranks did not all arrive, or they disagree on WORLD_SIZE (this rank's is 2)",
        f"the process group of 2 ranks did not form at 127.0.0.1:{port}: another rank went away during the "
        "rendezvous: it failed or was stopped, and its own message says why",
    ) or said0.startswith(("another rank did not answer within 8 s: ", "lost another rank (")), err0
    lines1 = err1.splitlines()
    assert len(lines1) == 1 and (lines1[0].startswith(
        f"python -m train (rank 1): error: the 3 ranks did not all meet at 127.0.0.1:{port} within 2 s (") or
        lines1[0] == f"python -m train (rank 1): error: the process group of 3 ranks did not form at 127.0.0.1:{port}: "
                     "rank 0, which hosts the rendezvous there, went away during the rendezvous: it failed or was "
                     "stopped, and its own message says why"), err1


def test_a_group_of_one_that_times_out_never_says_start_every_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29520")
    timed_out = RuntimeError("The client socket has timed out after 2000ms while trying to connect to (10.0.0.1, "
                             "29520).")
    said = _setup_failure(timed_out, DistEnv(world_size=1, launched=True, timeout_s=2))
    assert said == ("the process group of 1 rank did not form at 10.0.0.1:29520 within 2 s (The client socket has "
                    "timed out after 2000ms while trying to connect to (10.0.0.1, 29520)): this rank hosts the "
                    "rendezvous, so MASTER_ADDR must name this machine (127.0.0.1)")
    refused = _setup_failure(RuntimeError("Connection refused"), DistEnv(world_size=1, launched=True))
    assert refused == "could not form the process group of 1 rank at 10.0.0.1:29520: Connection refused"


def test_a_rendezvous_ended_by_a_closed_connection_says_who_went_away_not_torchs_text(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29520")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    closed = RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown "
                          "or crash?")
    assert _setup_failure(closed, DistEnv(rank=1, world_size=3, launched=True)) == (
        "the process group of 3 ranks did not form at 127.0.0.1:29520: rank 0, which hosts the rendezvous there, "
        "went away during the rendezvous: it failed or was stopped, and its own message says why")
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection reset by peer")
    assert _setup_failure(reset, DistEnv(rank=0, world_size=2, launched=True)).startswith(
        "the process group of 2 ranks did not form at 127.0.0.1:29520: another rank went away during the rendezvous")
    assert "another rank went away" in _setup_failure(reset, DistEnv(rank=1, world_size=3, launched=True))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert "torchrun's agent, which hosts the rendezvous there, went away" in _setup_failure(
        closed, DistEnv(rank=0, world_size=2, launched=True))


@pytest.mark.parametrize("timeout_s, applied", [(2, 3), (2.5, 3), (1, 2)])
def test_the_store_hosts_wait_for_the_other_ranks_is_said_as_long_as_torch_applied_it(monkeypatch, timeout_s,
                                                                                      applied):
    """torch's store host counts whole seconds and gives up once more of them than the timeout have passed: the
    line said "within 2 s" beside torch's "Timed out after 3 seconds"."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29520")
    waited = RuntimeError(f"Timed out after {applied} seconds waiting for clients. 1/2 clients joined.")
    said = _setup_failure(waited, DistEnv(world_size=2, launched=True, timeout_s=timeout_s))
    assert said.startswith(f"the 2 ranks did not all meet at 127.0.0.1:29520 within {applied} s (Timed out after "
                           f"{applied} seconds waiting for clients"), said
    client = RuntimeError("wait timeout after 2000ms, keys: /default_pg/0//cpu//0/2")
    assert " within 2 s (wait timeout after 2000ms" in _setup_failure(client, DistEnv(world_size=3, launched=True,
                                                                                      timeout_s=2))
