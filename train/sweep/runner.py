"""Execute runs as `python -m train` subprocesses, one per worker, and record each finished run atomically.

A run's result lives at STUDY/run-results/<run_id>.json (not "runs/", which .gitignore keeps out of git, so a
study's results can be committed) and is written only after its training process exited successfully, so
resuming a study is "skip every run whose result file exists". Training directories live elsewhere (`runs_root`,
gitignored), each with its log beside it (`<run_id>.log`: `python -m train` takes only an empty or run directory
as --out); a retried run continues its interrupted training from resume.pt.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from models.checkpoint import META_FILE, read_checkpoint_meta
from models.host import usable_cpus
from models.io import atomic_write_json, not_a_file, parse_strict_json, read_regular_file
from models.jsonfields import Fields
from train.report import METRICS_FILE, read_metrics
from train.sweep.spec import RunSpec

RESULT_FORMAT = "vitc-sweep-run"
RESULT_VERSION = 1
# How each optimizer is selected on the training CLI (its "small" recipe for the embedded sets supplies the rest:
# warm-up, cosine schedule, label smoothing, light augmentation, EMA); lr and weight decay are always explicit.
OPTIMIZER_FLAGS: dict[str, tuple[str, ...]] = {"adamw": ("--optimizer", "adamw"), "sgd": ("--optimizer", "sgd")}
LOG_TAIL = 4000
MAX_REASON = 1000  # characters of the training's error line quoted in the sweep's one line
TRAIN_PROG = "python -m train"
RESULTS_DIR = "run-results"
MAX_RESULT_BYTES = 64 << 20  # a result holds a record per epoch: ~150 bytes x up to 100,000 epochs
LEGACY_LOG = "train.log"  # where earlier versions kept a run's log: inside its training directory
WAKE_S = 0.2  # how often the waiting main thread looks for a signal that a worker thread received


class RunFailed(RuntimeError):
    """A training subprocess exited with an error: one line, its own error line and its log's path.

    `code` is the sweep's exit code for it: 2 where the training refused its input (its own exit 2), else 1.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class DamagedResult(ValueError):
    """A run's result file exists but is not a well-formed result (a report would silently leave the run out)."""


def result_path(study_dir: Path, spec: RunSpec) -> Path:
    """Where a finished run's result JSON lives."""
    return Path(study_dir) / RESULTS_DIR / f"{spec.run_id}.json"


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return _number(x) and math.isfinite(x)


def _percent(x: object, diverged: bool) -> bool:
    """An error in percent: 0..100, or null/NaN/infinite where the trainer recorded that the run diverged."""
    if x is None or (_number(x) and not math.isfinite(x)):
        return diverged
    return _finite(x) and 0 <= x <= 100


def _str_or_null(x: object) -> bool:
    return x is None or isinstance(x, str)


def machine_problem(mach: object, name: str = "machine") -> str | None:
    """Why `mach` is not a machine record as host_facts and runtime.machine write it (the fields the report prints
    and groups runs by), or None; the message starts with `name`."""
    if not isinstance(mach, dict):
        return f"{name} must be an object, got {mach!r:.60}"
    for key in ("host", "cpu", "gpu", "torch"):
        if not _str_or_null(mach.get(key)):
            return f"{name}.{key} must be a string or null, got {mach[key]!r:.60}"
    cpus = mach.get("usable_cpus")
    if cpus is not None and not (isinstance(cpus, int) and not isinstance(cpus, bool) and cpus >= 1):
        return f"{name}.usable_cpus must be a positive integer or null, got {cpus!r:.60}"
    git = mach.get("git")
    if git is None:
        return None
    if not isinstance(git, dict):
        return f"{name}.git must be an object or null, got {git!r:.60}"
    if not _str_or_null(git.get("commit")):
        return f"{name}.git.commit must be a string or null, got {git['commit']!r:.60}"
    if git.get("dirty") is not None and not isinstance(git["dirty"], bool):
        return f"{name}.git.dirty must be true, false or null, got {git['dirty']!r:.60}"
    return None


_DIVERGED = "training.diverged is true"


def result_problem(data: object, spec: RunSpec) -> str | None:
    """Why `data` is not the result of `spec` as run_one writes it (the fields the report reads, each possible and
    agreeing with the trainer's own summary), or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if data.get("id") != spec.run_id or data.get("spec") != spec.to_dict():
        return f"it is the result of another run ({data.get('id')!r:.80})"
    if not (_finite(data.get("wall_s")) and data["wall_s"] >= 0):
        return f"wall_s must be a finite number >= 0, got {data.get('wall_s')!r}"
    training = data.get("training")
    if training is not None and not isinstance(training, dict):
        return f"training must be the trainer's summary (an object) or null, got {training!r:.60}"
    diverged = (training or {}).get("diverged", False)
    if not isinstance(diverged, bool):
        return f"training.diverged must be true or false, got {diverged!r:.60}"
    machine = data.get("machine")  # absent in runs from before results recorded it
    return (_numbers_problem(data, diverged) or _summary_disagrees(data, training or {})
            or _curve_problem(data.get("curve"), diverged)
            or (None if machine is None else machine_problem(machine)))


def _numbers_problem(data: dict[str, Any], diverged: bool) -> str | None:
    """The record's errors and val set size, where impossible, or None."""
    # Only a run the trainer recorded as diverged may lack a finite error: any other null or NaN was counted as
    # 100 % without a word, and an error beyond 0..100 (a hand edit) turned verdicts.
    err = data.get("final_val_error")
    if not _percent(err, diverged):
        return f"final_val_error must be a number in 0..100 (null or NaN only where {_DIVERGED}), got {err!r:.60}"
    ema = data.get("final_val_error_ema")  # null without EMA weights
    if ema is not None and not _percent(ema, diverged):
        return f"final_val_error_ema must be a number in 0..100 or null (NaN only where {_DIVERGED}), got {ema!r:.60}"
    n_val = data.get("val_images")
    if n_val is not None and not (isinstance(n_val, int) and not isinstance(n_val, bool) and n_val >= 1):
        return f"val_images must be a positive integer or null, got {n_val!r}"
    return None


def _summary_disagrees(data: dict[str, Any], training: dict[str, Any]) -> str | None:
    """Where the record's error or val set size disagrees with the trainer's summary it was read from, or None."""
    top1, err = training.get("final_val_top1"), data.get("final_val_error")
    if _finite(top1) and _finite(err) and abs(err - 100.0 * (1.0 - top1)) > 1e-3:
        return (f"final_val_error {err!r} disagrees with training.final_val_top1 {top1!r} (an error of "
                f"{100.0 * (1.0 - top1):.4g} %)")
    n = training.get("val_images")
    if n is not None and data.get("val_images") is not None and n != data["val_images"]:
        return f"val_images {data['val_images']!r} disagrees with training.val_images {n!r:.60}"
    return None


def _curve_problem(curve: object, diverged: bool) -> str | None:
    """What is impossible in the per-epoch curve (errors the "best" metric reads, times the cost table reads)."""
    if not isinstance(curve, list) or not all(isinstance(r, dict) for r in curve):
        return f"curve must be a list of per-epoch records, got {curve!r:.60}"
    for rec in curve:
        for key in ("val_error", "val_error_ema"):
            if rec.get(key) is not None and not _percent(rec[key], diverged):
                return f"curve: {key} must be a number in 0..100 or null (NaN only where {_DIVERGED}), got {rec[key]!r}"
        if rec.get("epoch_time_s") is not None and not (_finite(rec["epoch_time_s"]) and rec["epoch_time_s"] >= 0):
            return f"curve: epoch_time_s must be a finite number >= 0 or null, got {rec['epoch_time_s']!r}"
    return None


def read_result(study_dir: Path, spec: RunSpec) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None) for a finished run, (None, None) without a result file, (None, why) for a damaged one."""
    path = result_path(study_dir, spec)
    try:
        # A regular file (a FIFO or a device is refused unread), at most MAX_RESULT_BYTES of it, nesting bounded; NaN
        # stays readable (a diverged run's error, as earlier sweeps wrote it).
        data = parse_strict_json(read_regular_file(path, MAX_RESULT_BYTES), MAX_RESULT_BYTES, non_finite=True)
    except FileNotFoundError:
        return None, None
    except OSError as exc:  # unreadable
        return None, f"{type(exc).__name__}: {exc.strerror or exc}"
    except ValueError as exc:  # not a regular file, too large, truncated, not UTF-8, not JSON or nested too deeply
        return None, str(exc)
    problem = result_problem(data, spec)
    return (None, problem) if problem else (data, None)


def damaged_results(study_dir: Path, specs: Sequence[RunSpec]) -> list[str]:
    """"<path>: <why>" for each result file of `specs` that exists but is not a well-formed result."""
    out = []
    for spec in dict.fromkeys(specs):
        problem = read_result(study_dir, spec)[1]
        if problem:
            out.append(f"{result_path(study_dir, spec)}: {problem}")
    return out


def is_done(study_dir: Path, spec: RunSpec) -> bool:
    """True when the run's result file holds a well-formed result of this very spec (a damaged one is redone)."""
    return read_result(study_dir, spec)[0] is not None


def load_result(study_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The run's result dict, or None if it has not finished (or its result is damaged)."""
    return read_result(study_dir, spec)[0]


def build_command(spec: RunSpec, run_dir: Path, threads: int | None = None) -> list[str]:
    """The one place the per-run command line is built: an ordinary `python -m train`.

    `--resume` makes a retry continue an interrupted training from its resume.pt (or start fresh when there is
    none); a run that finished training but whose result was never recorded just rewrites its checkpoint.
    """
    return [
        sys.executable, "-m", "train",
        "--model", spec.model,
        "--dataset", spec.dataset,
        "--epochs", str(spec.epochs),
        *OPTIMIZER_FLAGS[spec.optimizer],
        "--lr", repr(spec.lr),
        "--weight-decay", repr(spec.weight_decay),
        "--seed", str(spec.seed),
        *spec.train_args,
        *(("--threads", str(threads)) if threads else ()),
        "--out", str(run_dir),
        "--resume",
    ]


@dataclass(frozen=True)
class WorkerSlot:
    """What one worker process is given: CPU threads and, on GPU machines, one visible device."""

    threads: int
    device: str | None = None

    def env(self) -> dict[str, str]:
        """The subprocess environment: thread caps so N workers share the cores, and the worker's GPU."""
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        return env


def make_slots(workers: int, devices: Sequence[str] = (), threads: int | None = None) -> list[WorkerSlot]:
    """`workers` slots; cores are split evenly unless `threads` is given; devices are dealt round-robin."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    per = threads if threads else max(1, usable_cpus() // workers)
    return [WorkerSlot(per, devices[i % len(devices)] if devices else None) for i in range(workers)]


def host_facts() -> dict[str, Any]:
    """Where this process runs, without torch: host name, CPU model, usable CPUs and the source commit (with its
    dirty flag), so every run result says which machine and code trained it."""
    import platform
    import re

    from models.host import source_revision

    cpu = platform.processor() or platform.machine()
    try:
        if m := re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M):
            cpu = m.group(1).strip()
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "usable_cpus": usable_cpus(), "git": source_revision()}


def _pct_error(top1: float | None) -> float | None:
    """Top-1 accuracy fraction -> error in percent (None stays None)."""
    return None if top1 is None else round(100.0 * (1.0 - float(top1)), 4)


class DamagedTraining(ValueError):
    """A training that exited 0 left a checkpoint.json or metrics.jsonl its result cannot be read from."""


def read_training(run_dir: Path) -> dict[str, Any]:
    """The training CLI's outputs, normalised: the checkpoint's training summary and a per-epoch error curve;
    DamagedTraining (one line) for a checkpoint.json the checkpoint contract refuses or a damaged metrics.jsonl."""
    metrics = Path(run_dir) / METRICS_FILE
    try:
        # The checkpoint contract's reader (size bound, format_version, strict JSON, typed fields), as export and
        # evaluation read the same file: a damaged or hand-edited one is refused, not half-read into a result.
        meta = read_checkpoint_meta(run_dir)
        summary = Fields(meta.raw.get("training") or {}, str(meta.path / META_FILE), "training")
        numbers = {k: summary.get(k, float, None) for k in _SUMMARY_NUMBERS}
        counts = {k: summary.get(k, int, None, check=lambda v: v >= 0, what="a count") for k in _SUMMARY_COUNTS}
        curve = [_curve_point(Fields(r, f"{metrics} line {i}")) for i, r in enumerate(read_metrics(metrics), 1)
                 if "val_top1" in r]
    except OSError as exc:  # metrics.jsonl (read_checkpoint_meta says its own as a CheckpointError)
        raise DamagedTraining(f"cannot read {metrics}: {exc.strerror or exc}") from None
    except ValueError as exc:  # CheckpointError, FieldError, read_metrics's: one line naming the file and the field
        raise DamagedTraining(str(exc)) from None
    return {
        "final_val_error": _pct_error(numbers["final_val_top1"]),
        "final_val_error_ema": _pct_error(numbers["final_val_top1_ema"]),
        "val_images": counts["val_images"],
        "train_images": counts["train_images"],
        "train_time_s": numbers["train_time_s"],
        "curve": curve,
        "training": summary.raw,
    }


_SUMMARY_NUMBERS = ("final_val_top1", "final_val_top1_ema", "train_time_s")
_SUMMARY_COUNTS = ("val_images", "train_images")


def _curve_point(r: Fields) -> dict[str, Any]:
    """One evaluated epoch of metrics.jsonl as the result's curve holds it; FieldError for an ill-typed field."""
    return {
        "epoch": r.get("epoch", int),
        "train_loss": r.get("train_loss", float, None),
        "val_error": _pct_error(r.get("val_top1", float, None)),
        "val_error_ema": _pct_error(r.get("val_top1_ema", float, None)),
        "epoch_time_s": r.get("epoch_time_s", float, None),
    }


def log_path(runs_root: Path, spec: RunSpec) -> Path:
    """A run's training log, beside its training directory."""
    return Path(runs_root) / f"{spec.run_id}.log"


class LogRefused(ValueError):
    """A run's log path holds something the sweep neither writes to nor replaces (a FIFO, a directory)."""


def _own_log(log: Path) -> None:
    """Make `log` a path the sweep may append to: a symbolic link there is removed (the log is the sweep's own: its
    output goes to a fresh file, never through a link to a file elsewhere); LogRefused for anything else there that
    is not a regular file (never opened: a FIFO would block the writer)."""
    try:
        mode = os.lstat(log).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        log.unlink()
    elif not stat.S_ISREG(mode):
        raise LogRefused(f"its log {log} {not_a_file(log)}: remove it to train the run")


def _open_log(log: Path) -> BinaryIO:
    """`log` opened to append to (created if missing): a regular file, never written through a link (one put there
    since `_own_log` ran fails the open) nor a FIFO waited on; LogRefused when it is not one."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(log, flags, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        raise LogRefused(f"its log {log} is not a regular file: remove it to train the run") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogRefused(f"its log {log} is not a regular file: remove it to train the run")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def _open_regular(path: Path) -> BinaryIO | None:
    """`path` opened to read when it is a regular file (not through a link, never waiting on a FIFO), else None;
    OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _adopt_legacy_log(run_dir: Path, log: Path) -> None:
    """Move a log an earlier version left inside the run directory out beside it (appended, nothing lost)."""
    old = run_dir / LEGACY_LOG
    if not old.is_file() or old.is_symlink():
        return
    _own_log(log)
    if not log.exists():
        os.replace(old, log)
        return
    source = _open_regular(old)
    if source is None:  # swapped for something else meanwhile: left where it is
        return
    with source, _open_log(log) as f:
        shutil.copyfileobj(source, f)  # a block at a time, whatever its size
    old.unlink()


def _attempt_lines(log: Path, began: int) -> list[str]:
    """The non-blank lines the latest attempt wrote to `log` (from byte `began`, at most its last LOG_TAIL bytes):
    read from a regular file only, never through a link (what was swapped in for the log is not read)."""
    try:
        f = _open_regular(log)
        if f is None:
            return []
        with f:
            end = f.seek(0, os.SEEK_END)
            start = max(began, end - LOG_TAIL)
            f.seek(start)
            text = f.read(max(0, end - start)).decode(errors="replace")  # no further, should it still grow
    except OSError:
        return []
    lines = [line.strip() for line in re.split(r"[\r\n]+", text)]
    if start > began and lines:  # the window starts inside a line: not a whole one
        lines = lines[1:]
    return [line for line in lines if line]


def run_failed(spec: RunSpec, rc: int, log: Path, began: int) -> RunFailed:
    """The one-line failure of a training that exited `rc`: its own last error line (`python -m train: error:
    ...`), else its last line, and the log; exit 2 where the training refused its input, else 1."""
    lines = _attempt_lines(log, began)
    said = [line for line in lines if line.startswith(f"{TRAIN_PROG}: ")]
    what = f"`{TRAIN_PROG}` exited {rc}"
    if rc < 0:
        try:
            what = f"`{TRAIN_PROG}` was killed by {signal.Signals(-rc).name}"
        except ValueError:
            what = f"`{TRAIN_PROG}` was killed by signal {-rc}"
    if said:
        reason = said[-1].removeprefix(f"{TRAIN_PROG}: ").removeprefix("error: ")
        what += f": {reason[:MAX_REASON]}"
    elif lines and rc > 0:  # a crash without the CLI's own line (a traceback's last line, say)
        what += f"; its last line: {lines[-1][:MAX_REASON]}"
    elif rc > 0:
        what += " with no output"
    return RunFailed(f"{spec.run_id}: {what} (log {log})", code=2 if rc == 2 else 1)


def run_one(
    spec: RunSpec,
    study_dir: Path,
    runs_root: Path,
    slot: WorkerSlot,
    trainings: Trainings | None = None,
) -> dict[str, Any] | None:
    """Train one run (resuming an interrupted attempt) and write its result JSON; raises RunFailed on failure, and
    returns None without starting it once `trainings` is stopped."""
    run_dir = Path(runs_root) / spec.run_id
    log = log_path(runs_root, spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = build_command(spec, run_dir, slot.threads)
    try:
        _own_log(log)
        _adopt_legacy_log(run_dir, log)
        log_file = _open_log(log)
    except LogRefused as exc:  # exit 2, as a damaged result is: a file in the study's runs directory
        raise RunFailed(f"{spec.run_id}: {exc}", code=2) from None
    start = time.time()
    with log_file:
        began = os.fstat(log_file.fileno()).st_size  # this attempt's output starts here (earlier ones stay above)
        # A new session so an interrupt of the sweep can stop the whole training process group.
        proc = (trainings or Trainings()).start(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=slot.env(),
                                                start_new_session=True, preexec_fn=_stop_with_parent)
        if proc is None:
            return None
        try:
            rc = proc.wait()
        finally:
            if trainings is not None:
                trainings.finished(proc)
    wall = time.time() - start
    if rc != 0:
        raise run_failed(spec, rc, log, began)
    try:
        training = read_training(run_dir)
    except DamagedTraining as exc:  # exit 2, as a damaged result is: the files in the study's run directory
        raise RunFailed(f"{spec.run_id}: `{TRAIN_PROG}` exited 0, but its output is refused: {exc}; delete {run_dir} "
                        f"to train the run again", code=2) from None
    result = {
        "format": RESULT_FORMAT,
        "format_version": RESULT_VERSION,
        "id": spec.run_id,
        "spec": spec.to_dict(),
        "command": ["python", *cmd[1:]],
        "wall_s": round(wall, 2),
        "threads": slot.threads,
        "device": slot.device,
        "machine": host_facts(),
        **training,
    }
    atomic_write_json(result_path(study_dir, spec), result)
    return result


def run_all(
    specs: Sequence[RunSpec],
    study_dir: Path,
    runs_root: Path,
    slots: Sequence[WorkerSlot],
    progress: Callable[[RunSpec, dict[str, Any] | None], None] | None = None,
) -> list[RunSpec]:
    """Run every spec without a result yet, one per slot at a time; returns the specs it trained.

    The first failure stops the sweep (running trainings are terminated): a crash is a bug to fix, and the
    finished runs are kept, so the rerun resumes where it stopped.
    """
    todo = list(dict.fromkeys(s for s in specs if not is_done(study_dir, s)))
    if not todo:
        return []
    free: queue.Queue[WorkerSlot] = queue.Queue()
    for slot in slots:
        free.put(slot)
    trainings = Trainings()
    lock = threading.Lock()

    def task(spec: RunSpec) -> RunSpec:
        slot = free.get()
        try:
            if trainings.stopped:  # another run failed or the sweep was interrupted: start nothing new
                return spec
            result = run_one(spec, study_dir, runs_root, slot, trainings)  # None: stopped as it was to start
        except BaseException:
            # Stopped before the slot is freed: a queued run would otherwise take it and start a training before the
            # main thread has seen this failure.
            trainings.stop()
            raise
        finally:
            free.put(slot)
        if progress is not None and result is not None:
            with lock:
                progress(spec, result)
        return spec

    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="sweep-worker")
    futures = []
    try:
        futures += [pool.submit(task, s) for s in todo]  # inside: an interrupt while submitting stops them too
        pending = set(futures)
        while pending:
            # Woken every WAKE_S: the kernel may hand a Ctrl-C or SIGTERM to a worker thread, where Python only
            # flags it for the main thread, which, asleep until a run fails or all finish, trained them all first.
            done, pending = wait(pending, timeout=WAKE_S, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # re-raise the first failure
    except BaseException:
        for f in futures:
            f.cancel()
        trainings.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return todo


class Trainings:
    """The sweep's running training processes. Once stopped, none starts: the stop and each start (its check,
    fork and registration) hold one lock, so a stop never misses a training being forked (it then waited for
    that whole run)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen] = {}
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether the sweep is stopping (a start would then be refused)."""
        return self._stopped

    def start(self, cmd: Sequence[str], **popen: Any) -> subprocess.Popen | None:
        """Popen(cmd, **popen), registered; None (nothing started) once the sweep is stopped."""
        with self._lock:
            if self._stopped:
                return None
            proc = subprocess.Popen(cmd, **popen)
            self._procs[proc.pid] = proc
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        """Forget a training that has exited."""
        with self._lock:
            self._procs.pop(proc.pid, None)

    def stop(self) -> list[subprocess.Popen]:
        """Start nothing more; the trainings running now."""
        with self._lock:
            self._stopped = True
            return list(self._procs.values())

    def terminate(self, grace: float = 10.0) -> None:
        """Stop, then end every running training (SIGTERM, SIGKILL after `grace` seconds)."""
        _terminate(self.stop(), grace)


def _prctl() -> Any:
    """libc's prctl, looked up in the sweep's process (the child between fork and exec only calls it); None off
    Linux."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In a training's child process: SIGTERM it when the sweep dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG),
    so no training goes on writing into a study nobody runs (and holding its lock against the rerun)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, 15)  # SIGTERM: the training saves nothing half-written and exits 143


def _terminate(live: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each live training process group, then SIGKILL whatever is left after `grace` seconds."""
    for p in live:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
