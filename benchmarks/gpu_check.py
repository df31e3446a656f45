"""`make gpu-check`: the whole GPU path in one command, each step a process with its share of one time budget.

    python -m benchmarks.gpu_check                # on a CUDA machine: a budget of 15 minutes (--budget), one GPU
    python -m benchmarks.gpu_check --device cuda:1   # every step on GPU 1 alone (CUDA_VISIBLE_DEVICES=1)
    python -m benchmarks.gpu_check --full         # every target, TensorRT INT8 and the 4GF..72GF sweep (30 minutes)
    python -m benchmarks.gpu_check --device cpu --smoke --out /tmp/x   # the same steps, tiny, on the CPU

Steps: CUDA training with torch.compile (vit_c_mini, animals, one epoch); a real NCCL process group (torchrun, one
rank); export of that checkpoint to torch fp32/bf16/fp16 (and TensorRT fp16, INT8 with --full, where installed)
through the export's parity gates; parity of every torch precision on the GPU itself (bf16 also compiled); the GPU
latency benchmark on the 1GF pair (eager and compiled torch-CUDA, TensorRT fp16, onnxruntime-CUDA; with --full
every torch-CUDA target, TensorRT INT8 and bf16 on 4GF..72GF) against the matmul limit of the same run, its
bundles exported with max batch 64 (cached under exports/gpu-check/ in the current directory, or --cache); that
vit_c_1gf bundle served over HTTP (bf16, compiled, --max-batch-size 64, 224x224 JPEG requests) at concurrency 1, 16
and 64.

`--device cuda:N` runs every step with CUDA_VISIBLE_DEVICES set to GPU N alone and `--device cuda` (training,
torchrun and the latency benchmark know no index; the export builds its TensorRT engine on the first GPU it sees),
so every number comes from the GPU asked for; N is checked against the GPUs torch sees before any step.

The default budget is sized for a cold machine: empty inductor and TensorRT timing caches and no cached bundles,
where the one-time work (compiles, two TensorRT engine builds and ONNX exports of the 1GF pair) is most of the
run; with the caches warm the check takes well under it. Each step runs in a process group of its own and gets its
share of what is left of the budget; a step past its share is stopped with everything it started (torchrun's
workers, a server), and a step with too little time left is not started: both are recorded as cut for time. A
failed, stopped or skipped step is recorded with its reason and output, and the next steps still run: the check
passes only when every step ran and passed. Writes <date>-<time>-<host>-gpu-check.json / .md (e.g.
2026-12-07-1741-vm-gpu-check.json, the time in UTC as HHMM) to --out
(benchmarks/results by default), next to the latency and HTTP reports the steps write there.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.cli import (
    InputError,
    OneLineParser,
    command,
    device_arg,
    error_reason,
    float_in,
    int_in,
    last_line,
    refuse_empty_paths,
    signals_caught,
)
from models.oneline import first_line

PROG = "python -m benchmarks.gpu_check"
REPO = Path(__file__).resolve().parents[1]
MAX_PARITY_SAMPLES = 100_000
MAX_BUDGET_S = 86_400.0
SCHEMA = "vitc-gpu-check"
# The GPU run's benchmark bundles, apart from `make bench`'s exports/bench/: exported with max batch 64 (the served
# bundle's, so the compiled server captures no batch size it cannot be sent), they are reused from one check to the
# next, where a bench cache could hand over a bundle of max batch 256. Under the current directory, as the bench
# cache is: the package directory of an installed vitc (site-packages) is no place to write, and may be read-only.
GPU_CACHE = Path("exports") / "gpu-check"
RESERVE_S = 15.0  # of the budget, kept for the environment and the report after the last step
MIN_STEP_S = 10.0  # a step given less than this is not started: nothing on a GPU proves anything in less
KILL_GRACE_S = 10.0  # SIGTERM to SIGKILL, for a stopped step's processes (a server drains, torchrun stops workers)
KILL_WAIT_S = 5.0  # for SIGKILL to take effect (a process in uninterruptible sleep, e.g. a GPU driver call)
STDOUT_TAIL_BYTES = 64 * 1024  # read back of a step's stdout (its last line is its JSON facts)
STDERR_TAIL_BYTES = 16 * 1024
REASON_CHARS = 300
# What a step cut for time tells the reader: the check failed for want of time, not because the step failed.
CUT_ADVICE = ("rerun with a larger --budget (the inductor, TensorRT and bundle caches this run filled make the next "
              "run quicker)")


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check on a GPU (default or --full), or a smoke run of the same steps on the CPU.

    `shares` weigh each step's part of the budget: a step gets its share of what is left when it starts, beside the
    shares of the steps still to come (what a quick step leaves goes to the later ones)."""

    train: tuple[str, ...]
    ddp: tuple[str, ...]
    parity_samples: int
    latency: tuple[tuple[str, ...], ...]
    serve_args: str
    load: tuple[str, ...]
    budget_s: float
    shares: Mapping[str, float]
    int8: bool = False  # TensorRT INT8 in the export step (NNCF calibration on the CPU, then a second engine build)
    cache: Path | None = GPU_CACHE  # None: a cache under the working directory (the smoke run's own); see bundle_cache
    export_max_batch: int | None = None  # the export step's --max-batch (None: export's default)


_GPU_TARGETS = ("torch-cuda-fp32,torch-cuda-bf16,torch-cuda-bf16-compiled,torch-cuda-fp16,tensorrt-fp16,"
                "onnxruntime-cuda-fp32")
_FULL_TARGETS = _GPU_TARGETS + (",torch-cuda-bf16-nchw,torch-cuda-bf16-compiled-nchw,torch-cuda-fp16-compiled,"
                                "tensorrt-int8")
# The largest benchmarked batch is the benchmark bundles' max batch (benchmarks/suite.py: max(32, *batch sizes)) and
# the served bundle's: it must equal the server's --max-batch-size below.
SERVE_MAX_BATCH = 64
_GPU_TRAIN = ("--model", "vit_c_mini", "--dataset", "animals", "--epochs", "1", "--compile")
_GPU_DDP = ("--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "20")
_GPU_SERVE = f"--precision bf16 --compile --max-batch-size {SERVE_MAX_BATCH}"
# Seconds each step is expected to take on a cold machine (empty inductor and TensorRT timing caches, no cached
# bundles), estimated from the work each one does (no GPU has run the check yet); the shares are these estimates,
# and the budget leaves about half as much again on top. What dominates:
# - train: the inductor compile of vit_c_mini's forward and backward (evaluation runs uncompiled);
# - export: the ONNX export and a TensorRT fp16 engine build of vit_c_mini;
# - parity-on-device: one reduce-overhead compile of vit_c_mini, captured at 1 and the max batch;
# - latency-1: per model of the 1GF pair an ONNX export and a TensorRT fp16 engine build (about 2 minutes for the
#   first, less for the second, which finds most layers in the timing cache), then the bf16 compile of both (batch
#   1 and 64: two graphs each) and 12 timed cells of the pair; with its bundles cached (exports/gpu-check/) and
#   inductor's cache warm, about a minute;
# - serve-under-load: a server that compiles and captures the 1GF model at 7 buckets (about a minute), then about
#   half a minute of requests: concurrency 1 in 8 one-second rounds, the three load levels and the open loop (2 s
#   warm-up each). benchmarks/e2e.py does not compile the model a second time in-process for a compiled torch
#   server: its reference is the server's own compute stage (Server-Timing).
_GPU_COLD_S = {"train": 70, "ddp": 25, "export": 60, "parity-on-device": 45, "latency-1": 280, "serve-under-load": 90}
GPU = Sizes(
    train=_GPU_TRAIN,
    ddp=_GPU_DDP,
    parity_samples=256,
    latency=(
        ("--pairs", "1gf", "--targets", _GPU_TARGETS, "--batch-sizes", f"1,{SERVE_MAX_BATCH}", "--cell-seconds", "1",
         "--limit-seconds", "1", "--parity-samples", "16", "--no-plots", "--no-progress"),
    ),
    serve_args=_GPU_SERVE,
    # 3 s a level: thousands of requests at each concurrency on a GPU, enough for the check's p50/p99 and req/s.
    load=("--image-format", "jpeg", "--image-size", "224", "--concurrency", "1,16,64", "--duration", "3"),
    budget_s=900.0,
    shares=_GPU_COLD_S,
)
GPU_FULL = Sizes(
    train=_GPU_TRAIN,
    ddp=_GPU_DDP,
    parity_samples=256,
    latency=(
        ("--pairs", "1gf", "--targets", _FULL_TARGETS, "--batch-sizes", f"1,8,{SERVE_MAX_BATCH}", "--cell-seconds",
         "1.5", "--parity-samples", "64", "--no-progress"),
        ("--pairs", "4gf,18gf,36gf,72gf", "--targets", "torch-cuda-bf16,torch-cuda-bf16-nchw",
         "--batch-sizes", f"1,16,{SERVE_MAX_BATCH}", "--cell-seconds", "1", "--parity-samples", "16", "--no-progress"),
    ),
    serve_args=_GPU_SERVE,
    load=("--image-format", "jpeg", "--image-size", "224", "--concurrency", "1,16,64", "--duration", "8"),
    budget_s=1800.0,
    shares={"train": 120, "ddp": 40, "export": 200, "parity-on-device": 120, "latency-1": 500, "latency-2": 550,
            "serve-under-load": 250},
    int8=True,
)
SMOKE = Sizes(
    train=("--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "3",
           "--train-subset", "64", "--val-subset", "32", "--batch-size", "16"),
    ddp=("--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "2",
         "--train-subset", "64", "--batch-size", "16"),
    parity_samples=32,
    # The matmul limit timed 0.1 s a precision (--quick: 0.3) and 0.5 s a load level: the smoke run proves that each
    # step runs and reports, not what its numbers are.
    latency=(("--quick", "--pairs", "micro", "--targets", "torch-fp32", "--batch-sizes", "1", "--cell-seconds",
              "0.3", "--min-reps", "3", "--limit-seconds", "0.1", "--parity-samples", "8", "--no-plots",
              "--no-progress"),),
    serve_args="",
    load=("--quick", "--concurrency", "1", "--duration", "0.5", "--no-plots"),
    budget_s=1800.0,  # under a minute on 2 CPUs: the budget only stops a hung step
    shares={"train": 1, "ddp": 1, "export": 1, "parity-on-device": 1, "latency-1": 1, "serve-under-load": 1},
    cache=None,
    # Parity and the device's parity run over batches up to the max batch: 4 keeps the CPU smoke run short.
    export_max_batch=4,
)


class Budget:
    """One time budget shared by the steps, in order: each gets its share of what is left when it starts."""

    def __init__(self, total_s: float, shares: Mapping[str, float], *, reserve_s: float = RESERVE_S,
                 min_step_s: float = MIN_STEP_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s, self.reserve_s, self.min_step_s, self._clock = total_s, reserve_s, min_step_s, clock
        self._pending = dict(shares)  # the steps not started yet, in order, and their weights
        self._start = clock()

    def left(self) -> float:
        """Seconds left for the steps (the reserve for the report excluded); never negative."""
        return max(0.0, self.total_s - self.reserve_s - (self._clock() - self._start))

    def take(self, name: str) -> float:
        """`name`'s seconds: its share of what is left beside the steps still to come (0 when too little is left:
        the step is not started). The step counts as started either way."""
        weight = self._pending.pop(name)
        total = weight + sum(self._pending.values())
        allowed = self.left() * (weight / total if total > 0 else 1.0)
        return allowed if allowed >= self.min_step_s else 0.0

    def drop(self, name: str) -> None:
        """`name` will not run (what it needed failed): its share goes to the steps after it."""
        self._pending.pop(name, None)


@dataclass(frozen=True)
class Finished:
    """How a step's process ended: exit code, whether it was stopped at its time limit, seconds, its output."""

    rc: int
    timed_out: bool
    seconds: float
    stdout: str = ""
    stderr: str = ""
    leftovers: int = 0  # processes of its group still running when it exited (stopped then)


def _tail(f: Any, limit: int) -> str:
    """The last `limit` bytes of the binary file `f`, decoded as UTF-8 (undecodable bytes replaced)."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - limit))
    return f.read().decode("utf-8", errors="replace")


STEP_ENV = "VITC_GPU_CHECK_STEP"  # marks a step's processes, inherited by everything it starts


@dataclass(frozen=True)
class StepGroup:
    """A step's processes: its process group, and any process carrying its mark in the environment (torchrun starts
    each worker in a session of its own; a process whose parent died is no one's child any more)."""

    pgid: int
    mark: str

    def members(self) -> list[int]:
        """Live (not zombie) processes of the step; without /proc, [pgid] while its group has any process."""
        proc = Path("/proc")
        if not proc.is_dir():
            try:
                os.killpg(self.pgid, 0)
            except (ProcessLookupError, PermissionError):
                return []
            return [self.pgid]
        mark = f"\0{STEP_ENV}={self.mark}\0".encode()
        found = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
                if fields[0] in "ZX":
                    continue
                if fields[2] == str(self.pgid) or mark in b"\0" + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):  # it exited meanwhile, or is another user's
                continue
        return found

    def signal(self, sig: int) -> None:
        """`sig` to the group and to every marked process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def end(self, grace: float = KILL_GRACE_S) -> int:
        """SIGTERM every process of the step still running, SIGKILL those still there `grace` seconds later; how
        many there were."""
        found = len(self.members())
        if not found:
            return 0
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
            self.signal(sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and self.members():
                time.sleep(0.05)
            if not self.members():
                break
        return found


def run_group(cmd: Sequence[str], timeout: float, *, grace: float = KILL_GRACE_S,
              env: Mapping[str, str] | None = None) -> Finished:
    """Run `cmd` (with `env` over this process's environment; in the directory of this vitc, which the step then
    imports: serve.launch.child_env) in a session (and process group) of its own for at most
    `timeout` seconds; then, stopped or not, whatever it left running is stopped too (torchrun's workers, a
    server it started, DataLoader workers keep GPU memory otherwise). Output goes to files, not pipes: a process
    left holding a pipe would make the wait outlast the command."""
    from serve.launch import child_env

    t0 = time.perf_counter()
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    step_env = {**child_env({**os.environ, **(env or {})}), STEP_ENV: mark}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc: subprocess.Popen | None = None
        timed_out = False
        try:
            # A signal during Popen's wait for the exec would leave the step running, unknown: it is raised once
            # the step is recorded, here where its cleanup below stops it.
            with signals_caught():
                proc = subprocess.Popen(list(cmd), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        env=step_env, start_new_session=True)
            group = StepGroup(proc.pid, mark)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            leftovers = group.end(grace)  # the command itself too, when it timed out
            proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of the check: its own session no longer hears the terminal
            if proc is not None:
                StepGroup(proc.pid, mark).end(grace)
                proc.wait()
            raise
        seconds = time.perf_counter() - t0
        return Finished(proc.returncode, timed_out, seconds, _tail(out, STDOUT_TAIL_BYTES),
                        _tail(err, STDERR_TAIL_BYTES), leftovers - (1 if timed_out else 0))


class StepSaid(RuntimeError):
    """What a step printed, as an error: the shared helpers read its line (models.cli.last_line, first_line)."""


def _last_said(text: str) -> str:
    """The last non-blank line of a step's output ('' for none): its JSON facts, or the error it ended with."""
    return last_line(StepSaid(text)) if text.strip() else ""


def shown(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The step's command as a shell line that reruns it, the variables it was given in front."""
    return shlex.join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd])


def step_result(name: str, cmd: Sequence[str], allowed: float, done: Finished, *,
                env: Mapping[str, str] | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """A step's record: `status` passed | failed | cut (stopped at its time limit), a one-line `reason` unless it
    passed, exit code, seconds, and the tails of its stdout and stderr."""
    if done.timed_out:
        of = f"the {budget_s:.0f} s budget" if budget_s else "the budget"
        status, reason = "cut", (f"cut for time: stopped after {allowed:.0f} s (its share of what was left of {of}), "
                                 f"not failed; {CUT_ADVICE}")
    elif done.rc:
        said = _last_said(done.stderr) or _last_said(done.stdout) or "no output"
        status, reason = "failed", f"exit {done.rc}: {said[:REASON_CHARS]}"
    else:
        status, reason = "passed", None
    keep = 3000 if status != "passed" else 400
    out = done.stdout[-keep // 3:] + ("\n--- stderr ---\n" + done.stderr[-keep:] if done.stderr.strip() else "")
    doc = {"name": name, "command": shown(cmd, env), "status": status, "reason": reason,
           "rc": 124 if done.timed_out else done.rc, "seconds": round(done.seconds, 1),
           "allowed_s": round(allowed, 1), "facts": {}, "output_tail": out, "last_line": _last_said(done.stdout)}
    if done.leftovers > 0:
        doc["stopped_leftovers"] = done.leftovers  # processes it left running, stopped by the check
    return doc


def not_run(name: str, cmd: Sequence[str], reason: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The record of a step that was not started, and why."""
    return {"name": name, "command": shown(cmd, env), "status": "not run", "reason": reason, "rc": None,
            "seconds": 0.0, "allowed_s": 0.0, "facts": {}, "output_tail": "", "last_line": ""}


def fail(step: dict[str, Any], reason: str) -> None:
    """Mark a step that exited 0 as failed, for what its results show."""
    step["status"], step["reason"] = "failed", first_line(StepSaid(reason), REASON_CHARS)
    step["rc"] = step["rc"] or 1


def _step(name: str, cmd: list[str], budget: Budget, log: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """Run one step with its share of the budget (the command never raises here)."""
    allowed = budget.take(name)
    if not allowed:
        reason = (f"not run: cut for time: {budget.left():.0f} s of the {budget.total_s:.0f} s budget left; "
                  f"{CUT_ADVICE}")
        log(f"[gpu-check] {name}: {reason}")
        return {**not_run(name, cmd, reason, env), "cut_for_time": True}
    log(f"[gpu-check] {name} (at most {allowed:.0f} s): {shown(cmd, env)}")
    s = step_result(name, cmd, allowed, run_group(cmd, allowed, env=env), env=env, budget_s=budget.total_s)
    if s["status"] == "cut":
        s["cut_for_time"] = True
    log(f"[gpu-check] {name}: {s['status']} (exit {s['rc']}) in {s['seconds']:.1f} s"
        + (f": {s['reason']}" if s["status"] == "cut" else ""))
    return s


def _skip(name: str, cmd: list[str], budget: Budget, reason: str, log: Any, env: Mapping[str, str]) -> dict[str, Any]:
    budget.drop(name)
    log(f"[gpu-check] {name}: {reason}")
    return not_run(name, cmd, reason, env)


TRAINING_FACTS = ("model", "device_name", "amp", "channels_last", "compile", "world_size", "ddp_backend", "steps",
                  "samples_per_s", "final_val_top1", "wall_time_s")


def _training_facts(step: dict[str, Any], run_dir: Path) -> None:
    """A passed training step's facts, from the summary in its checkpoint.json read through the checkpoint contract
    (size bound, format_version, strict JSON); the step fails with the contract's one line where it is refused."""
    from models.checkpoint import CheckpointError, read_checkpoint_meta

    try:
        training = read_checkpoint_meta(run_dir).raw.get("training") or {}
    except CheckpointError as exc:
        fail(step, f"its checkpoint is refused: {exc}")
        return
    step["facts"] = {k: training.get(k) for k in TRAINING_FACTS}


def _newest(out: Path, pattern: str, since: float) -> Path | None:
    found = [p for p in out.glob(pattern) if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _latency_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader wants from a latency run: best throughput and batch-1 latency per target, C/P."""
    rows = {}
    for r in doc.get("results", []):
        key = f"{r['model']} {r['target']}"
        best = rows.setdefault(key, {"b1_p50_ms": None, "best_ips": 0.0, "best_batch": None})
        if r["batch"] == 1:
            best["b1_p50_ms"] = round(r["latency_ms"]["p50"], 3)
        if r["throughput_ips"] > best["best_ips"]:
            best.update(best_ips=round(r["throughput_ips"], 1), best_batch=r["batch"],
                        fraction_of_limit=r.get("fraction_of_limit"))
    ratios = [{"pair": x["pair"], "target": x["target"], "batch": x["batch"], "c_over_p": round(x["ratio"], 3),
               "verdict": x.get("verdict")} for x in doc.get("ratios", [])]
    return {"targets": rows, "c_over_p": ratios, "skipped": doc.get("skipped"), "wall_seconds": doc.get("wall_seconds"),
            "machine_limit": doc.get("machine_limit")}


def parity_on_device(bundle: Path, checkpoint: Path, device: str, samples: int) -> dict[str, Any]:
    """Every torch artifact of the bundle on `device` (bf16 also compiled) through the export's parity gate; one the
    export refused is listed as failed with the export's reason."""
    from export.bundle import parity_data
    from export.parity import measure
    from models.bundle import read_manifest
    from models.checkpoint import load_checkpoint
    from runtimes import BackendOptions, open_backend

    manifest = read_manifest(bundle)
    out: dict[str, Any] = {}
    for art in manifest.artifacts:
        if art.runtime == "torch" and not art.servable:
            out[art.precision] = {"passed": False, "refused": art.refused_reason,
                                  "failures": [f"refused by the export: {art.refused_reason}"]}
    model, meta = load_checkpoint(checkpoint)
    max_batch = manifest.input.max_batch
    data = parity_data(model, meta, manifest.source.dataset or meta.dataset, samples, max_batch)
    for art in manifest.servable("torch"):
        # Compiled (CUDA graphs) for the precision served compiled; compiling on the CPU (inductor, minutes) would
        # prove nothing the GPU run does not. Captured at batch 1 (its own specialisation) and the max batch, which
        # every larger batch of the parity set is padded up to: a bucket in between would cost another inductor
        # compile (a size guard splits the symbolic batch at 16) and prove nothing more about parity.
        for compiled in (False, True) if device.startswith("cuda") and art.precision == "bf16" else (False,):
            options = BackendOptions(device=device, compile=compiled, buckets=tuple(sorted({1, max_batch})))
            t0 = time.perf_counter()
            backend = open_backend(bundle, manifest, "torch", art.precision, options)
            load_s = time.perf_counter() - t0
            try:
                p = measure(backend.infer, data, art.precision, max_batch)
            finally:
                backend.close()
            out[f"{art.precision}{'-compiled' if compiled else ''}"] = {
                "passed": p.passed, "top1_agreement": p.top1_agreement, "max_abs_err": p.max_abs_err,
                "accuracy_delta": p.accuracy_delta, "load_s": round(load_s, 2), "failures": list(p.failures)}
    return out


def export_facts(bundle: Path, wanted: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Each artifact of the bundle's manifest, "certified" or "refused: <reason>", and the problems: every refused
    artifact and every wanted artifact id the manifest does not list."""
    from models.bundle import read_manifest

    facts: dict[str, str] = {}
    problems: list[str] = []
    for a in read_manifest(bundle).artifacts:
        if a.servable:
            facts[a.id] = "certified"
        else:
            facts[a.id] = f"refused: {a.refused_reason}"
            problems.append(f"{a.id} refused: {a.refused_reason}")
    problems += [f"{w} missing from the manifest" for w in wanted if w not in facts]
    return facts, problems


def parity_problems(facts: Mapping[str, Any]) -> list[str]:
    """What failed in a parity-on-device result: each precision that did not pass, with its first failure."""
    return [f"{k}: {(v.get('failures') or ['failed'])[0]}" for k, v in facts.items() if not v.get("passed")]


def latency_problems(doc: Mapping[str, Any]) -> list[str]:
    """Targets the benchmark could run here but that failed (it lists them as skipped, "failed: ...", and goes
    on); those it could not run here (not installed) are reported in its facts, not as failures."""
    return [f"{x.get('pair')} {x['target']}: {x['reason']}" for x in doc.get("skipped") or []
            if str(x.get("reason", "")).startswith("failed:")]


def bundle_cache(sizes: Sizes, work: Path, cache: Path | None = None) -> Path:
    """Where the latency steps keep their bundles, absolute (the steps run in another directory): `cache`
    (--cache), else the sizes' own, reused from one check to the next (relative: under the current directory), else
    one of the run's own under `work` (the smoke run's)."""
    chosen = cache if cache is not None else sizes.cache
    return chosen.absolute() if chosen is not None else work / "bench"


def cuda_index(device: str) -> int | None:
    """N of `cuda:N`; None for cuda (the first GPU torch sees) and cpu."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


def step_device(device: str, environ: Mapping[str, str] = os.environ) -> tuple[str, dict[str, str]]:
    """The --device every step gets and the variables it runs with: `cuda:N` becomes `cuda` with
    CUDA_VISIBLE_DEVICES naming GPU N alone (train and torchrun take no index, the latency targets and the export's
    TensorRT build use the first GPU they see), N counted as torch counts, among the GPUs already visible here."""
    n = cuda_index(device)
    if n is None:
        return device, {}
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "cuda", {"CUDA_VISIBLE_DEVICES": str(n)}
    entries = [e.strip() for e in visible.split(",")]
    if n >= len(entries) or not entries[n]:
        raise ValueError(f"--device {device}: CUDA_VISIBLE_DEVICES={visible!r} names no GPU {n}")
    return "cuda", {"CUDA_VISIBLE_DEVICES": entries[n]}


def run(device: str, sizes: Sizes, out: Path, work: Path, log: Any = print,
        budget: Budget | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Every step in order, each with its share of `budget` (default: the sizes' own), the latency steps' bundles
    cached in bundle_cache(sizes, work, cache); the JSON document."""
    from benchmarks import machine

    budget = budget or Budget(sizes.budget_s, sizes.shares)
    py = sys.executable
    start = time.time()
    steps: list[dict[str, Any]] = []
    train_dir, ddp_dir, bundle = work / "train", work / "ddp", work / "bundle"
    # `device` as this process names it; `dev` (with `env`) as every step does.
    dev, env = step_device(device)

    cmd = [py, "-m", "train", *sizes.train, "--device", dev, "--out", str(train_dir)]
    s = _step("train", cmd, budget, log, env)
    if s["status"] == "passed":
        _training_facts(s, train_dir)
    steps.append(train := s)

    cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "train", *sizes.ddp,
           "--device", dev, "--out", str(ddp_dir)]
    s = _step("ddp", cmd, budget, log, env)
    if s["status"] == "passed":
        _training_facts(s, ddp_dir)
        expected = "nccl" if device.startswith("cuda") else "gloo"
        if s["status"] == "passed" and s["facts"]["ddp_backend"] != expected:
            fail(s, f"process group backend {s['facts']['ddp_backend']}, expected {expected}")
    steps.append(s)

    import runtimes
    from benchmarks.bundles import expand_targets

    targets = ["torch-fp32", "torch-bf16", "torch-fp16"]
    trt = runtimes.get("tensorrt")
    if device.startswith("cuda") and trt.installed() and trt.unavailable(device) is None:
        targets += ["tensorrt-fp16", "tensorrt-int8"] if sizes.int8 else ["tensorrt-fp16"]
    # --strict: a refused artifact is exit 1, and the manifest says which and why.
    cmd = [py, "-m", "export", "--checkpoint", str(train_dir), "--out", str(bundle), "--targets", ",".join(targets),
           "--parity-samples", str(sizes.parity_samples), "--strict"]
    if sizes.export_max_batch is not None:
        cmd += ["--max-batch", str(sizes.export_max_batch)]
    t0 = time.time()
    if train["status"] != "passed":
        s = _skip("export", cmd, budget, f"not run: needs the checkpoint of train, which {train['status']}", log,
                  env)
    else:
        s = _step("export", cmd, budget, log, env)
    if (bundle / "manifest.json").is_file() and (bundle / "manifest.json").stat().st_mtime >= t0:
        s["facts"], problems = export_facts(bundle, expand_targets(targets))
        if problems and s["status"] in ("passed", "failed"):
            fail(s, "; ".join(problems))
    steps.append(export := s)

    cmd = [py, "-m", "benchmarks.gpu_check", "--parity-of", str(bundle), "--checkpoint", str(train_dir), "--device",
           dev, "--parity-samples", str(sizes.parity_samples)]
    if not export["facts"]:
        s = _skip("parity-on-device", cmd, budget, f"not run: needs the bundle of export, which {export['status']}",
                  log, env)
    else:
        s = _step("parity-on-device", cmd, budget, log, env)
    if s["status"] == "passed":
        s["facts"] = json.loads(s["last_line"])
        if problems := parity_problems(s["facts"]):
            fail(s, "; ".join(problems))
    steps.append(s)

    latency_docs = []
    # A smoke run keeps its bundle cache to itself; a GPU run reuses its own from one check to the next.
    cache_args = ("--cache", str(bundle_cache(sizes, work, cache)))
    for i, args in enumerate(sizes.latency):
        t0 = time.time()
        s = _step(f"latency-{i + 1}", [py, "-m", "benchmarks.latency", *args, *cache_args, "--out", str(out)], budget,
                  log, env)
        if (path := _newest(out, "*.json", t0)) is not None and s["status"] == "passed":
            doc = json.loads(path.read_text())
            s["facts"], s["report"] = _latency_facts(doc), path.name
            latency_docs.append(doc)
            if problems := latency_problems(doc):
                fail(s, "; ".join(problems))
        steps.append(s)

    served = _served_bundle(latency_docs) or bundle
    t0 = time.time()
    server_args = f"--device {dev} {sizes.serve_args}".strip()
    cmd = [py, "-m", "benchmarks.latency", "--http", "start", "--bundle", str(served), "--runtime", "torch",
           f"--server-args={server_args}", *sizes.load, "--out", str(out)]
    if not (served / "manifest.json").is_file():
        s = _skip("serve-under-load", cmd, budget, "not run: no bundle to serve (latency-1 and export made none)", log,
                  env)
    else:
        s = _step("serve-under-load", cmd, budget, log, env)
    if (path := _newest(out, "*-http.json", t0)) is not None and s["status"] == "passed":
        doc = json.loads(path.read_text())
        s["facts"] = {"bundle": str(served), "bundle_max_batch": _max_batch(served), "server_args": server_args,
                      "overhead": doc.get("overhead"),
                      "closed": [{k: lvl.get(k) for k in ("concurrency", "throughput_rps", "latency_ms", "errors")}
                                 for lvl in doc.get("closed", [])]}
        s["report"] = path.name
    steps.append(s)

    return {"schema": SCHEMA, "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": device,
            "step_device": dev, "step_env": env,
            "smoke": sizes is SMOKE, "full": sizes is GPU_FULL, "budget_s": budget.total_s,
            "environment": machine.environment(None), "steps": steps,
            "passed": all(x["status"] == "passed" for x in steps),
            "cut": [{"step": x["name"], "reason": x["reason"]} for x in steps if x["status"] in ("cut", "not run")],
            "cut_for_time": [x["name"] for x in steps if x.get("cut_for_time")],
            "wall_seconds": round(time.time() - start, 1)}


def _max_batch(bundle: Path) -> int | None:
    from models.bundle import BundleError, read_manifest

    try:
        return read_manifest(bundle).input.max_batch
    except (BundleError, ValueError, OSError):
        return None


def _served_bundle(latency_docs: list[dict[str, Any]]) -> Path | None:
    """The vit_c_1gf bundle the GPU latency run exported (the model the serving check is stated for)."""
    for doc in latency_docs:
        path = (doc.get("models") or {}).get("vit_c_1gf", {}).get("bundle")
        if path and Path(path).is_dir():
            return Path(path)
    return None


def markdown(doc: dict[str, Any]) -> str:
    """One table of steps, then each step's facts."""
    from benchmarks.report import _git  # the commit, or why there is none, as every benchmark report says it

    env = doc["environment"]
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus") or []) or "none"
    lines = [f"# GPU check ({doc['created']}, {'smoke run on ' if doc['smoke'] else ''}{doc['device']})", "",
             f"- Machine: {env['cpu']['model']}, {env['cpu']['usable_cpus']} CPUs; GPUs: {gpus}; "
             f"{_git(env.get('git'))}",
             f"- Result: **{'passed' if doc['passed'] else 'FAILED'}** in {doc['wall_seconds']:.0f} s "
             f"(budget {doc['budget_s']:.0f} s{'; --full' if doc.get('full') else ''})",
             *([f"- **Cut for time** (stopped or not started, not failed): {', '.join(doc['cut_for_time'])}; "
                f"{CUT_ADVICE}"] if doc.get("cut_for_time") else []), "",
             "| step | result | exit | seconds | allowed s | report |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {'' if s['rc'] is None else s['rc']} | {s['seconds']:.1f} | "
              f"{s['allowed_s']:.0f} | {s.get('report', '')} |" for s in doc["steps"]]
    for s in doc["steps"]:
        lines += ["", f"## {s['name']}", "", f"`{s['command']}`", ""]
        if s["reason"]:
            lines += [f"**{s['status']}**: {s['reason']}", ""]
        if s["facts"]:
            lines += ["```json", json.dumps(s["facts"], indent=1, default=str)[:6000], "```"]
        if s["status"] != "passed" and s["output_tail"]:
            lines += ["```", s["output_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def _parity_main(args: argparse.Namespace) -> int:
    """--parity-of: the JSON line, or InputError (exit 2) for a bundle or checkpoint that cannot load."""
    from data.datasets import DatasetError
    from models.bundle import BundleError
    from models.checkpoint import CheckpointError
    from runtimes import BackendError

    if args.checkpoint is None:
        raise InputError("--parity-of needs --checkpoint")
    try:
        facts = parity_on_device(args.parity_of, args.checkpoint, args.device, args.parity_samples)
    except (ValueError, BackendError, OSError) as exc:  # BundleError, CheckpointError, DatasetError are ValueErrors
        # Ours whole (a path it names may hold a newline, which InputError's line escapes); a library's (a runtime's
        # several lines, a source location first) by its first line that says why.
        ours = isinstance(exc, BundleError | CheckpointError | DatasetError)
        raise InputError(error_reason(exc) if ours else first_line(exc)) from None
    print(json.dumps(facts))
    return 0


def _setup_problem(args: argparse.Namespace) -> str | None:
    """Why the check cannot run as asked, found before its first step (minutes) starts."""
    from benchmarks.report import out_dir_problem

    if args.device == "cpu" and not args.smoke:
        # The full sizes (vit_c_mini with torch.compile, the paper's 1GF..72GF pairs) are meant for a GPU: on the
        # CPU they would run for hours and prove nothing the smoke run does not.
        return "--device cpu runs the smoke check only: add --smoke (the full check needs a CUDA GPU)"
    if args.full and args.smoke:
        return "--full and --smoke exclude each other: --full is the GPU check with every target"
    for flag, path in (("--out", args.out), ("--work", args.work), ("--cache", args.cache)):
        if path is not None and (problem := out_dir_problem(path)):
            return f"{flag} {path}: {problem}; give a directory"
    return None


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Run the check (or, with --parity-of, one bundle's on-device parity as a JSON line)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default="cuda",
                   help="cuda (default) or cuda:N; cpu only with --smoke (the full check needs a GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes of the same steps (what the tests run with --device cpu)")
    p.add_argument("--out", default="benchmarks/results",
                   help="report directory, created if missing (default benchmarks/results under the current "
                   "directory)")
    p.add_argument("--work", help="working directory for runs and bundles (default: a temporary one)")
    p.add_argument("--cache", default=None,
                   help="bundle cache of the latency steps, reused from one check to the next (default "
                        f"{GPU_CACHE} under the current directory; the smoke run's own is under --work); not make "
                        "bench's exports/bench, whose bundles have another max batch")
    p.add_argument("--full", action="store_true",
                   help="every torch-CUDA target, TensorRT INT8 and the 4GF..72GF bf16 sweep (default budget 30 "
                        "minutes)")
    p.add_argument("--budget", type=float_in(RESERVE_S + MIN_STEP_S, MAX_BUDGET_S), default=None, metavar="SECONDS",
                   help=f"the whole check's time, shared by its steps (default {GPU.budget_s:.0f}, enough for a cold "
                        f"machine; --full {GPU_FULL.budget_s:.0f}; --smoke {SMOKE.budget_s:.0f}); a step past its "
                        "share is stopped and recorded as cut for time")
    p.add_argument("--parity-of", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--parity-samples", type=int_in(1, MAX_PARITY_SAMPLES), default=256, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Path("") is the current directory: `--work "$DIR"` with DIR unset would train and export here.
    paths = {"--out": "give the report directory, or omit --out for benchmarks/results",
             "--work": "give a working directory, or omit --work for a temporary one",
             "--cache": f"give the bundle cache directory, or omit --cache for {GPU_CACHE}",
             "--parity-of": "give the bundle directory", "--checkpoint": "give the checkpoint directory"}
    names = {flag: flag[2:].replace("-", "_") for flag in paths}
    refuse_empty_paths(p, ((flag, getattr(args, names[flag]), advice) for flag, advice in paths.items()))
    for name in names.values():
        setattr(args, name, None if (value := getattr(args, name)) is None else Path(value))
    # Absolute in the recorded commands, which are then rerun from any directory as they ran.
    args.out, args.work = args.out.absolute(), args.work and args.work.absolute()
    sizes = SMOKE if args.smoke else GPU_FULL if args.full else GPU
    # Checked with --out before any step (the latency step writes its bundles there minutes into the run); None:
    # the smoke run's own cache, under the work directory.
    chosen = args.cache if args.cache is not None else sizes.cache
    args.cache = chosen and chosen.absolute()
    if args.parity_of:
        return _parity_main(args)
    if problem := _setup_problem(args):
        raise InputError(problem)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("no CUDA GPU here (use --device cpu --smoke for the CPU smoke run)")
        if (n := cuda_index(args.device)) is not None and n >= (count := torch.cuda.device_count()):
            raise InputError(f"--device {args.device}: torch sees {count} CUDA GPU{'s' * (count != 1)} here "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        try:
            step_device(args.device)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    from benchmarks.report import publish, stem_name, unused_stem
    from models.io import strict_json_bytes

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitc-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        doc = run(args.device, sizes, args.out, work, log=lambda m: print(m, file=sys.stderr, flush=True),
                  budget=Budget(args.budget or sizes.budget_s, sizes.shares), cache=args.cache)
    doc["host"] = doc["environment"]["host"]
    stem = args.out / unused_stem(args.out, stem_name(doc, "-gpu-check"), (".json", ".md"))
    publish({stem.with_suffix(".json"): strict_json_bytes(doc), stem.with_suffix(".md"): markdown(doc).encode()},
            f"the results {stem.name} in {args.out}")
    cut = (f" ({', '.join(doc['cut_for_time'])} cut for time: rerun with a larger --budget than "
           f"{doc['budget_s']:.0f})" if doc["cut_for_time"] else "")
    print(f"{'passed' if doc['passed'] else 'FAILED'}{cut}: wrote {stem}.json, {stem}.md")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
