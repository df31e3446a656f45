"""Serving overhead, side by side in one run: the bare runtime, a hand-written server, and vitc.

    python -m benchmarks.overhead --bundle exports/bench/vit_c_1gf-random-init

Every system gets the same 256x256 PNG. Concurrency 1 is measured in interleaved rounds (bare onnxruntime, the
hand-written server of benchmarks/naive_server.py, vitc on onnxruntime, vitc on OpenVINO, one short slice each,
round after round), so the machine's drift hits all alike; vitc's answers carry a Server-Timing header that splits
its time into receive, decode, queue, compute and encode. Saturation is a closed loop at concurrency 16 per system,
against the runtime alone: a bare onnxruntime loop at the batch size vitc ran, and OpenVINO's own benchmark_app
(throughput hint) on the same IR. Cold start is process start -> ready, per backend. Results: JSON + Markdown in
benchmarks/results/ (machine, versions and commit included; the Markdown is printed before the files are written).
The servers listen on free loopback ports, or with `--port N` on N (the hand-written server and each cold start)
and N+1, N+2 (vitc on onnxruntime and OpenVINO), for hosts where only some ports may be used. A server that fails
(does not start, goes away, answers an error or no classification) ends the run with one line naming it (exit 1; 2
where it refused its port or the bundle at its start), every server stopped, and what was measured before saved as
<date>-<time>-<host>-overhead-partial.json / .md, marked partial.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import contextlib
import datetime as dt
import http.client
import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.cli import (
    InputError,
    OneLineParser,
    WorkFailed,
    command,
    float_in,
    int_in,
    refuse_empty_paths,
    signals_caught,
)
from runtimes.registry import DEFAULT_RUNTIME

if TYPE_CHECKING:
    from models.bundle import Manifest
    from runtimes.base import Backend

PROG = "python -m benchmarks.overhead"
SCHEMA = "vitc-overhead-benchmark"
COMPARED = "onnxruntime,openvino"  # the served runtimes the report compares, each with a bare reference
MAX_SECONDS = 3600.0


def request_image(size: int = 256) -> bytes:
    """The one request body: an animals validation image, upscaled to size x size RGB, as PNG."""
    from PIL import Image

    from data.datasets import load_dataset

    img = load_dataset("animals", "val").image(0).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{url} not ready within {timeout:g} s")


class ServerFailed(RuntimeError):
    """A server the run measures failed: it did not start, went away, or answered what no server of its kind answers
    (an error status, a body that is not a classification). Its message is the one line naming it; `code` is 2 where
    it refused what it was given at its start (its exit code 2: the port, the bundle), else 1; `doc` is what the run
    had measured by then, marked partial (None when nothing was)."""

    def __init__(self, reason: str, code: int = 1) -> None:
        super().__init__(reason)
        self.code, self.doc = code, None


def _exit_status(code: int) -> str:
    """"exited with code 3", or "was killed by SIGKILL" for a negative Popen return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _failure(exc: BaseException) -> str:
    """A request's failure in a few words: an error status, the OS's reason (Connection refused), a timeout, or the
    exception's type and message (BadStatusLine: the bytes that are not HTTP)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason  # urlopen's wrapper of the socket's error
    if isinstance(exc, TimeoutError):
        return "no answer in time (timed out)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    said, name = str(exc), type(exc).__name__
    return said if said.startswith(name) else f"{name}: {said}" if said else name  # IncompleteRead(...) names itself


class Server:
    """A server process on a loopback port: vitc (python -m serve) or the hand-written one."""

    def __init__(self, kind: str, bundle: Path, backend: str = DEFAULT_RUNTIME, log_dir: Path | None = None,
                 port: int | None = None) -> None:
        self.kind, self.port = kind, port or _free_port()
        self.name = kind if kind == "naive" else f"{kind}-{backend}"  # as the results name the system
        self.proc: subprocess.Popen | None = None
        self.failed = False  # its log is kept (and named) when it failed
        self._own_dir = None if log_dir else Path(tempfile.mkdtemp(prefix="vitc-overhead-"))  # removed by stop()
        log_dir = log_dir or self._own_dir
        self.log = log_dir / f"{kind}-{backend}.log"
        if kind == "vitc":
            cmd = [sys.executable, "-m", "serve", "--model", f"m={bundle}", "--backend", backend,
                   "--port", str(self.port), "--no-access-log"]
            self.path, ready = "/v1/models/m/classify", "/v2/health/ready"
        else:
            cmd = [sys.executable, "-m", "benchmarks.naive_server", str(bundle), "--port", str(self.port)]
            self.path, ready = "/classify", "/ready"
        t0 = time.perf_counter()
        try:  # from the temporary directory on: a signal at any point leaves neither it nor the process behind
            from serve.launch import REPO, child_env  # where this vitc lies: the server imports the same one

            env = child_env(os.environ)
            with signals_caught(), open(self.log, "wb") as log_file:  # the child keeps its own copy of the fd
                self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            _wait(f"http://127.0.0.1:{self.port}{ready}", self.proc)
        except RuntimeError as exc:
            code = self.proc.returncode if self.proc is not None else None
            self.failed = True
            self.stop()
            why = f"the server {_exit_status(code)}{self._last_words()}" if code is not None else str(exc)
            # Exit 2 is the server refusing what it was given (the port, the bundle): this run's input, not its work.
            raise ServerFailed(f"{self.name} did not start: {why} (log: {self.log})", code=2 if code == 2 else 1) \
                from None
        except BaseException:
            self.stop()
            raise
        self.cold_start_s = time.perf_counter() - t0
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def startup(self) -> dict[str, Any]:
        """vitc's own account of its start (the "listening" log line): process age and per-step seconds."""
        for line in self.log.read_text(errors="replace").splitlines():
            if '"listening"' in line:
                doc = json.loads(line)
                return {"process_age_s": doc.get("process_age_s"),
                        "steps_s": next(iter(doc["models"].values())).get("startup_s")}
        return {}

    def _last_words(self) -> str:
        """": <the last line of its log>" (its own error, one line) for a server that exited by itself, or ""."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        exited = self.proc is not None and (self.proc.poll() or 0) > 0  # killed: its last line is no reason
        return f": {lines[-1][:300]}" if lines and exited else ""

    def fail(self, what: str) -> ServerFailed:
        """The ServerFailed to raise for `what` happened to it mid-run, with how its process ended if it did; its log
        is kept and named."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.5)  # a server that dropped the connection as it died: its exit status, not "running"
        ended = f"; the server {_exit_status(self.proc.returncode)}{self._last_words()}" if (
            self.proc is not None and self.proc.returncode is not None) else ""
        self.failed = True
        return ServerFailed(f"{self.name} (port {self.port}): {what}{ended} (log: {self.log})")

    def post(self, body: bytes) -> tuple[float, dict[str, float]]:
        """One request: (seconds, Server-Timing stages in ms); ServerFailed when it gets no answer, an error status
        or an answer that is not a classification."""
        from benchmarks.e2e import classify_answer_problem
        from benchmarks.loadgen import MAX_ANSWER_BYTES, AnswerTooLarge, read_capped

        for attempt in (0, 1):
            t = time.perf_counter()
            try:
                self.conn.request("POST", self.path, body=body, headers={"Content-Type": "image/png"})
                r = self.conn.getresponse()
                # Bounded: a server gone wrong (or another service on its port) could stream without end.
                data = read_capped(r, MAX_ANSWER_BYTES, f"POST http://127.0.0.1:{self.port}{self.path}")
                break
            except AnswerTooLarge as exc:
                self.conn.close()  # the rest of the answer is left unread on it
                raise self.fail(str(exc)) from None
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
                # The server closed the idle keep-alive connection (uvicorn: after 5 s) while the other systems
                # had their slices: reconnect, and time the request on the new connection.
                self.conn.close()
                self.conn = self._connect()
                if attempt:
                    raise self.fail(f"POST {self.path}: {_failure(exc)}") from None
            except (OSError, http.client.HTTPException) as exc:  # refused, timed out, not HTTP, cut short
                self.conn.close()
                raise self.fail(f"POST {self.path}: {_failure(exc)}") from None
        dt_s = time.perf_counter() - t
        if r.status != 200:
            raise self.fail(f"POST {self.path}: HTTP {r.status} {r.reason}".rstrip())
        if problem := classify_answer_problem(data):  # after the clock stopped: not part of the latency
            raise self.fail(f"POST {self.path}: HTTP 200 but a bad answer: {problem}")
        timing = r.getheader("server-timing") or ""
        stages = {k.strip(): float(v) for k, v in re.findall(r"([a-z_]+);dur=([0-9.]+)", timing)}
        return dt_s, stages

    def metrics(self) -> dict[str, float]:
        """The batch-size sum and count of its /metrics; ServerFailed when they cannot be read."""
        from benchmarks.loadgen import AnswerTooLarge, get

        try:
            text = get(f"http://127.0.0.1:{self.port}/metrics", seconds=5).decode()  # whole by then, and bounded
            out = {}
            for name in ("vitc_batch_size_sum", "vitc_batch_size_count"):
                out[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
        except AnswerTooLarge as exc:
            raise self.fail(str(exc)) from None
        except (OSError, http.client.HTTPException) as exc:  # refused, an error status (HTTPError), timed out
            raise self.fail(f"GET /metrics: {_failure(exc)}") from None
        except (ValueError, IndexError) as exc:  # not UTF-8, a sample that is not a number
            raise self.fail(f"GET /metrics: not Prometheus text ({exc})") from None
        return out

    def stop(self, keep_log: bool | None = None) -> None:
        """Stop the server; its temporary log goes with it unless `keep_log` (default: whether it failed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not (self.failed if keep_log is None else keep_log) and self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


def _summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": int(a.size), "p50": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean())}


def single_stream(systems: dict[str, Any], rounds: int, slice_s: float) -> dict[str, Any]:
    """Concurrency 1, interleaved: each system one slice per round."""
    lat: dict[str, list[float]] = {k: [] for k in systems}
    stages: dict[str, dict[str, list[float]]] = {k: {} for k in systems}
    for fn in systems.values():  # warm up
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in systems.items():
            end = time.perf_counter() + slice_s
            while time.perf_counter() < end:
                seconds, st = fn()
                lat[name].append(seconds * 1e3)
                for k, v in st.items():
                    stages[name].setdefault(k, []).append(v)
    out = {}
    for name in systems:
        out[name] = {"latency_ms": _summary(lat[name]),
                     "server_timing_ms": {k: _summary(v) for k, v in stages[name].items()}}
    return out


def bare_backend(bundle: Path, runtime: str, body: bytes,
                 hint: str = "throughput") -> tuple[Backend, Manifest, np.ndarray]:
    """(backend with the server's default options for `hint`, manifest, the request preprocessed)."""
    import runtimes
    from models.bundle import read_manifest
    from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS
    from serve.imaging import prepare

    m = read_manifest(bundle)
    backend = runtimes.open_backend(bundle, m, runtime, options=runtimes.BackendOptions(hint=hint))
    x = prepare(body, m.preprocessing, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    return backend, m, x


def bare_throughput(backend: Backend, x: np.ndarray, batch: int, seconds: float) -> tuple[float, float]:
    """(images per second, CPU ms per image) of back-to-back `batch`-row calls, `backend.parallelism` loops at once
    (each stream kept busy, as the server keeps them)."""
    xb = np.ascontiguousarray(np.repeat(x, batch, axis=0))
    backend.infer(xb)
    counts: list[int] = []
    end = time.perf_counter() + seconds

    def loop() -> None:
        n = 0
        while time.perf_counter() < end:
            backend.infer(xb)
            n += batch
        counts.append(n)

    threads = [threading.Thread(target=loop) for _ in range(backend.parallelism)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    images, cpu = sum(counts), time.process_time() - cpu0
    return images / (time.perf_counter() - t0), cpu / max(1, images) * 1e3


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc; 0 where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ReferenceFailed(Exception):
    """OpenVINO's benchmark_app gave no figure; why, in one line (the result says it in place of the figure)."""


@contextlib.contextmanager
def verified_ir(bundle: Path, manifest: Manifest) -> Iterator[Path]:
    """The .xml of the bundle's openvino-fp32 IR, checked as a server checks it (listed, inside the bundle, its size
    and sha256), copied with its listed .bin into a temporary directory under one stem: benchmark_app reads the .bin
    named after the .xml and has no option for another, and beside the bundle's .xml that may be a file the manifest
    does not list. BundleError when a file fails its checks, or changed while it was copied."""
    from models.bundle import BundleError, verify_files
    from models.io import sha256_file

    artifact = manifest.select("openvino", "fp32")
    with tempfile.TemporaryDirectory(prefix="vitc-overhead-ir-") as tmp:
        for path, entry in zip(verify_files(bundle, artifact), artifact.files, strict=True):
            copy = Path(tmp) / ("model.xml" if path.name.endswith(".xml") else "model.bin")
            shutil.copyfile(path, copy)
            if sha256_file(copy) != entry.sha256:  # rewritten between its check and the copy: not what was checked
                raise BundleError(f"artifact file {entry.path!r} changed while it was copied (being written?)")
        yield Path(tmp) / "model.xml"


def benchmark_app(xml: Path, seconds: float, shape: tuple[int, ...]) -> tuple[float, float]:
    """OpenVINO's benchmark_app on the IR (throughput hint, f32, like vitc): (FPS, CPU ms per image); `xml` from
    verified_ir. ReferenceFailed when it is not installed, fails, or prints no throughput."""
    exe = Path(sys.executable).with_name("benchmark_app")
    if not exe.exists():
        raise ReferenceFailed(f"{exe} is not installed (it comes with the openvino package)")
    from runtimes import telemetry

    limit = seconds * 4 + 60
    with telemetry.quiet_child_env() as env:  # benchmark_app would report to Google Analytics
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            out = subprocess.run([str(exe), "-m", str(xml), "-d", "CPU", "-hint", "throughput", "-t",
                                  str(max(1, round(seconds))), "-shape", json.dumps(list(shape)).replace(" ", ""),
                                  "-infer_precision", "f32"],
                                 capture_output=True, text=True, timeout=limit, env=env)
        except subprocess.TimeoutExpired:
            raise ReferenceFailed(f"benchmark_app ran past its {limit:.0f} s limit") from None
        except OSError as exc:
            raise ReferenceFailed(f"benchmark_app could not start: {exc.strerror or exc}") from None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fps = re.search(r"Throughput:\s+([0-9.]+)\s+FPS", out.stdout)
    count = re.search(r"Count:\s+([0-9]+)\s+iterations", out.stdout)
    if out.returncode or not fps:
        how = _exit_status(out.returncode) if out.returncode else "printed no throughput"
        raise ReferenceFailed(f"benchmark_app {how}: {_last_line(out)}")
    # Two upper bounds, the smaller kept: its whole process (start, compile, warm-up included) over the images it
    # timed, and every usable core for the whole timed run.
    from models.host import usable_cpus

    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    per_image = min(cpu / int(count.group(1)) if count and int(count.group(1)) else np.inf,
                    usable_cpus() / float(fps.group(1)))
    return float(fps.group(1)), per_image * 1e3


def _last_line(out: subprocess.CompletedProcess) -> str:
    """What a failed tool said last, stderr first: the last line of OpenVINO's error (its traceback ends with it)
    names the cause ("Can not open file ... for mapping"), the lines above it where in OpenVINO's code it arose."""
    for text in (out.stderr, out.stdout):
        if lines := [line.strip() for line in (text or "").splitlines() if line.strip()]:
            return lines[-1][:300]
    return "no output"


def saturation(servers: dict[str, Server], references: dict[str, Any], manifest: Manifest, x: np.ndarray,
               bundle: Path, body: bytes, concurrency: int, seconds: float,
               rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Closed loops at `concurrency` per server, each round followed by the runtime alone (bare onnxruntime loops at
    the batch vitc ran, in vitc's stream layout and as one session on every core; OpenVINO's benchmark_app), so
    every ratio compares numbers taken a few seconds apart. Server and client CPU per request are counted too."""
    slice_s = seconds / rounds
    served: dict[str, dict[str, list]] = {k: {"rps": [], "batch": [], "p50": [], "server_cpu_ms": [],
                                              "client_cpu_ms": [], "errors": []} for k in servers}
    alone: dict[str, list] = {**{f"onnxruntime_{k}": [] for k in references}, "benchmark_app_fps": [],
                              "benchmark_app_cpu_ms": [], "benchmark_app_failures": [], "openvino_round_ratios": []}
    with contextlib.ExitStack() as held:
        xml = _reference_ir(held, bundle, manifest, alone["benchmark_app_failures"])
        for _ in range(rounds):
            _saturation_round(servers, references, manifest, x, xml, body, concurrency, slice_s, served, alone)
    sat = {k: {"throughput_rps": float(np.median(v["rps"])), "rounds_rps": v["rps"],
               "latency_p50_ms": float(np.median([p for p in v["p50"] if p is not None] or [0])),
               "mean_batch": float(np.mean(v["batch"])) if v["batch"] else None,
               "server_cpu_ms_per_request": float(np.median(v["server_cpu_ms"])),
               "client_cpu_ms_per_request": float(np.median(v["client_cpu_ms"])),
               # Failed requests of its slices (503s of a full queue, bad answers), by kind: none in a clean run.
               "errors": _merged(v["errors"])} for k, v in served.items()}
    # The runtime alone at its best at that batch: vitc's stream layout or one session on every core, per round.
    best = [max(ips for ips, _ in r) for r in zip(*(alone[f"onnxruntime_{k}"] for k in references), strict=True)]
    bare = {"onnxruntime_batch": max(1, round(sat["vitc-onnxruntime"]["mean_batch"] or 1)),
            "onnxruntime_layouts": {k: _layout(b) for k, b in references.items()},
            **{f"onnxruntime_{k}_ips": float(np.median([ips for ips, _ in alone[f"onnxruntime_{k}"]]))
               for k in references},
            **{f"onnxruntime_{k}_cpu_ms_per_image": float(np.median([c for _, c in alone[f"onnxruntime_{k}"]]))
               for k in references},
            "onnxruntime_ips": float(np.median(best)), "rounds_onnxruntime_ips": best,
            "benchmark_app_fps": float(np.median(alone["benchmark_app_fps"])) if alone["benchmark_app_fps"] else None,
            "rounds_benchmark_app_fps": alone["benchmark_app_fps"],
            "benchmark_app_cpu_ms_per_image": float(np.median(alone["benchmark_app_cpu_ms"]))
            if alone["benchmark_app_cpu_ms"] else None,
            # Per-round ratios: each server slice against the runtime alone right after it.
            "onnxruntime_round_ratios": [a / b for a, b in zip(served["vitc-onnxruntime"]["rps"], best,
                                                              strict=False)],
            "openvino_round_ratios": alone["openvino_round_ratios"],
            # Why benchmark_app gave no figure, a line per round it failed (or one for an IR that failed its checks).
            "benchmark_app_failures": alone["benchmark_app_failures"]}
    return sat, bare


def _saturation_round(servers: dict[str, Server], references: dict[str, Any], manifest: Manifest, x: np.ndarray,
                      xml: Path | None, body: bytes, concurrency: int, slice_s: float,
                      served: dict[str, dict[str, list]], alone: dict[str, list]) -> None:
    """One round of `saturation`: each server's slice, then its runtime alone (benchmark_app on `xml`, the verified
    IR, unless there is none), appended to `served` and `alone`."""
    from benchmarks.e2e import classify_answer_problem
    from benchmarks.loadgen import Endpoint, closed_loop

    for name, s in servers.items():
        before = s.metrics() if name != "naive" else {}
        cpu0 = _cpu_s(s.proc.pid)
        load = closed_loop(Endpoint(f"http://127.0.0.1:{s.port}{s.path}", check=classify_answer_problem), [body],
                           concurrency, slice_s, min(1.0, slice_s / 2))
        cpu = _cpu_s(s.proc.pid) - cpu0  # includes the warm-up requests: per request over all of them
        res, done = load.summary(), max(1, load.sent)
        # Gone, or every request failed (an error status, a bad answer, no answer in time): no figure to keep. A
        # slice too short for one answer has no errors, and stays a slice that measured nothing.
        if s.proc.poll() is not None or (not res["ok"] and (res["errors"] or res["warmup_errors"])):
            raise s.fail(f"saturation: {res['problem'] or 'gone mid-slice'}")
        served[name]["errors"].append(res["errors"])
        served[name]["server_cpu_ms"].append(cpu / done * 1e3)
        served[name]["client_cpu_ms"].append(load.client_cpu_s / done * 1e3)
        served[name]["rps"].append(res["throughput_rps"])
        served[name]["p50"].append((res["latency_ms"] or {}).get("p50"))
        if before:
            after = s.metrics()
            n = after["vitc_batch_size_count"] - before["vitc_batch_size_count"]
            served[name]["batch"].append((after["vitc_batch_size_sum"] - before["vitc_batch_size_sum"]) / n
                                         if n else 1.0)
        if name == "vitc-onnxruntime":
            batch = max(1, round(served[name]["batch"][-1]))
            for ref, backend in references.items():
                alone[f"onnxruntime_{ref}"].append(bare_throughput(backend, x, batch, slice_s / len(references)))
        if name == "vitc-openvino" and xml is not None:
            try:
                fps, cpu_ms = benchmark_app(xml, slice_s, (1, *manifest.input.sample_shape))
            except ReferenceFailed as exc:  # said in the result: a figure silently missing reads as none measured
                alone["benchmark_app_failures"].append(str(exc))
            else:
                alone["benchmark_app_fps"].append(fps)
                alone["benchmark_app_cpu_ms"].append(cpu_ms)
                # This round's slice against the runtime alone right after it (a failed round pairs with nothing).
                alone["openvino_round_ratios"].append(served[name]["rps"][-1] / fps)


def _reference_ir(held: contextlib.ExitStack, bundle: Path, manifest: Manifest, failures: list[str]) -> Path | None:
    """The verified IR benchmark_app runs, for as long as `held` is open; None, with why in `failures`, when the
    bundle's IR fails its checks (vitc's OpenVINO server refused it too, unless it changed since it started)."""
    from models.bundle import BundleError

    try:
        return held.enter_context(verified_ir(bundle, manifest))
    except BundleError as exc:
        failures.append(f"the IR was not run: {exc}")
        return None


def _merged(counts: list[dict[str, int]]) -> dict[str, int]:
    """Error counts by kind, summed over the rounds."""
    out: dict[str, int] = {}
    for c in counts:
        for kind, n in c.items():
            out[kind] = out.get(kind, 0) + n
    return out


def _layout(backend: Backend) -> str:
    """"2 streams x 1 thread": how a backend splits the CPU."""
    d = backend.describe()
    return f"{backend.parallelism} stream(s) x {d.get('threads_effective')} thread(s)"


def ports_needed(port: int, backends: list[str]) -> list[int]:
    """The ports of `--port N`: N for the hand-written server (and each cold start, one at a time), then one per
    vitc backend, all up at once."""
    return [port + i for i in range(1 + len(backends))]


def run(bundle: Path, rounds: int, slice_s: float, saturation_s: float, concurrency: int, cold_starts: int,
        backends: list[str], log: Callable[[str], None] = print, saturation_rounds: int = 5,
        port: int | None = None) -> dict[str, Any]:
    """Cold starts, then every system side by side at concurrency 1 and at saturation; the results document.
    `port`: the first of the loopback ports the servers use (`ports_needed`), None for free ones."""
    from benchmarks import machine

    def at(i: int) -> dict[str, int]:  # the Server keyword for the i-th port, none without --port
        return {} if port is None else {"port": ports_needed(port, backends)[i]}

    from models.bundle import read_manifest

    body = request_image()
    doc: dict[str, Any] = {"schema": SCHEMA, "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "bundle": str(bundle), "model": read_manifest(bundle).model, "image": "256x256 PNG",
                           "image_bytes": len(body), "environment": machine.environment(None),
                           "config": {"rounds": rounds, "slice_s": slice_s, "saturation_s": saturation_s,
                                      "saturation_rounds": saturation_rounds, "concurrency": concurrency}}
    stage = [STAGES[0]]  # where a server failing stopped the run
    try:
        log("cold starts ...")
        doc["cold_start"] = {}
        for backend in backends:
            runs = []
            for _ in range(cold_starts):
                s = Server("vitc", bundle, backend, **at(0))
                try:
                    runs.append({"ready_s": s.cold_start_s, **s.startup()})
                finally:
                    s.stop()
            doc["cold_start"][backend] = {"ready_s_median": float(np.median([r["ready_s"] for r in runs])),
                                          "runs": runs}
        _side_by_side(doc, bundle, body, backends, at, log, stage, rounds=rounds, slice_s=slice_s,
                      concurrency=concurrency, saturation_s=saturation_s, saturation_rounds=saturation_rounds)
    except ServerFailed as exc:
        exc.doc = mark_partial(doc, stage[0], str(exc))
        raise
    doc["verdict"] = verdict(doc)
    return doc


def _side_by_side(doc: dict[str, Any], bundle: Path, body: bytes, backends: list[str],
                  at: Callable[[int], dict[str, int]], log: Callable[[str], None], stage: list[str], *, rounds: int,
                  slice_s: float, concurrency: int, saturation_s: float, saturation_rounds: int) -> None:
    """Every system at concurrency 1, then at saturation, into `doc`; `stage[0]` says which part is running."""
    log("servers ...")
    stage[0] = STAGES[1]
    servers: dict[str, Server] = {}
    references: dict[str, Any] = {}
    try:  # each server is stopped whatever interrupts the run, the ones already up while a later one starts too
        servers["naive"] = Server("naive", bundle, **at(0))
        for i, b in enumerate(backends, 1):
            servers[f"vitc-{b}"] = Server("vitc", bundle, b, **at(i))
        ort, manifest, x = bare_backend(bundle, "onnxruntime", body)
        references["streams"] = ort
        references["one_session"], _, _ = bare_backend(bundle, "onnxruntime", body, hint="latency")

        def bare_call() -> tuple[float, dict[str, float]]:
            t = time.perf_counter()
            ort.infer(x)
            return time.perf_counter() - t, {}

        systems = {"bare-onnxruntime": bare_call, **{k: (lambda s=s: s.post(body)) for k, s in servers.items()}}
        log("concurrency 1, interleaved ...")
        stage[0] = STAGES[2]
        doc["single_stream"] = single_stream(systems, rounds, slice_s)
        log(f"saturation, concurrency {concurrency}, interleaved with the runtimes alone ...")
        stage[0] = STAGES[3]
        doc["saturation"], doc["bare_saturation"] = saturation(servers, references, manifest, x, bundle, body,
                                                               concurrency, saturation_s, rounds=saturation_rounds)
    finally:
        for backend in references.values():
            backend.close()
        for s in servers.values():
            s.stop()


# The parts of a run, in order: what a partial result names as done, stopped in, or not measured.
STAGES = ("cold starts", "server starts", "concurrency 1", "saturation")
MEASURED = {"cold starts": "cold_start", "concurrency 1": "single_stream", "saturation": "saturation"}


def mark_partial(doc: dict[str, Any], stage: str, reason: str) -> dict[str, Any] | None:
    """`doc` marked as a partial result (`partial`: why the run stopped, in which part, what it measured and what
    not), or None when it holds no measurement at all."""
    measured = [part for part, key in MEASURED.items() if doc.get(key)]
    if not measured:
        return None
    doc["partial"] = {"stopped_during": stage, "reason": reason, "measured": measured,
                      "not_measured": [part for part in MEASURED if part not in measured],
                      "cold_start_backends": sorted(doc.get("cold_start") or {})}
    return doc


def verdict(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers the acceptance criteria are stated in."""
    s1, sat, bare = doc["single_stream"], doc["saturation"], doc["bare_saturation"]
    p50 = {k: v["latency_ms"]["p50"] for k, v in s1.items()}
    out = {
        "c1_p50_ms": p50,
        "vitc_minus_bare_ms": p50["vitc-onnxruntime"] - p50["bare-onnxruntime"],
        "vitc_below_naive": p50["vitc-onnxruntime"] < p50["naive"],
        "saturation_rps": {k: v["throughput_rps"] for k, v in sat.items()},
        "onnxruntime_fraction_of_bare": float(np.median(bare["onnxruntime_round_ratios"])),
        "openvino_fraction_of_benchmark_app": float(np.median(bare["openvino_round_ratios"]))
        if bare["openvino_round_ratios"] else None,
        "cold_start_s": {k: v["ready_s_median"] for k, v in doc["cold_start"].items()},
    }
    out["within_5_ms_of_bare"] = out["vitc_minus_bare_ms"] <= 5.0
    return out


def _reference_cell(bare: dict[str, Any]) -> str:
    """benchmark_app's throughput, and why it is missing from any round (or from all: then in place of a figure)."""
    failures, fps = bare.get("benchmark_app_failures") or [], bare["benchmark_app_fps"]
    if fps is None:
        return f"not measured: {failures[0] if failures else 'no round ran it'}"
    if not failures:
        return f"{fps:.1f} img/s"
    return f"{fps:.1f} img/s ({len(failures)} round(s) failed: {failures[0]})"


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def _cpu_lines(sat: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    """Where the CPU goes at saturation: each server's and its client's CPU per request against its runtime's own
    per image, and the throughput ratio that leaves on a machine whose cores the runtime alone fills."""
    runtime = {"vitc-onnxruntime": bare.get("onnxruntime_streams_cpu_ms_per_image"),
               "vitc-openvino": bare.get("benchmark_app_cpu_ms_per_image")}
    if runtime["vitc-onnxruntime"] is None:
        return []
    lines = ["", "CPU per request at saturation (ms; the runtime alone: onnxruntime in vitc's layout, OpenVINO's "
                 "benchmark_app process):", "",
             "| | server | runtime alone, per image | server beyond the runtime | client | CPU-bound estimate |",
             "|---|---|---|---|---|---|"]
    for name, v in sat.items():
        server, client = v.get("server_cpu_ms_per_request"), v.get("client_cpu_ms_per_request")
        if server is None:
            continue
        alone = runtime.get(name)
        if alone is None:
            lines.append(f"| {name} | {server:.1f} | – | – | {client:.2f} | – |")
            continue
        # Every core busy: the served rate is about runtime CPU / (server + client CPU) of the runtime alone's.
        lines.append(f"| {name} | {server:.1f} | {alone:.1f} | {server - alone:.1f} | {client:.2f} | "
                     f"{alone / (server + client):.2f} |")
    lines += ["", "CPU-bound estimate: with every core busy and the client on the same cores, the served throughput "
                  "is about runtime CPU / (server + client CPU) of the runtime alone's. An estimate, not a bound: the "
                  "server's batches can cost less CPU per image than the runtime alone's calls measured here. Image "
                  "decoding and HTTP are in the server's part."]
    return lines


def _setup_lines(doc: dict[str, Any]) -> list[str]:
    """The machine, the request and the run's sizes."""
    from benchmarks.report import _git  # the commit, or why there is none, as every benchmark report says it

    env, cfg = doc["environment"], doc["config"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return [
        f"- Machine: {env['cpu']['model']}, {env['cpu']['usable_cpus']} CPUs ({' '.join(env['cpu']['flags'])}); "
        f"{_git(env.get('git'))}; {versions}",
        f"- Request: the same {doc['image']} ({doc['image_bytes']} bytes) every time; client on the same machine.",
        f"- Concurrency 1: {cfg['rounds']} interleaved rounds of {cfg['slice_s']} s per system; saturation: closed "
        f"loop at concurrency {cfg['concurrency']} for {cfg['saturation_s']} s per system in "
        f"{cfg.get('saturation_rounds', 3)} rounds.",
    ]


def _cold_start_lines(doc: dict[str, Any]) -> list[str]:
    lines = ["", "Cold start (process start -> ready, median):", ""]
    for backend, c in doc["cold_start"].items():
        steps = c["runs"][0].get("steps_s") or {}
        lines.append(f"- {backend}: {c['ready_s_median']:.2f} s; first run: process age at listening "
                     f"{c['runs'][0].get('process_age_s')} s, model steps {steps}")
    return lines


def partial_markdown(doc: dict[str, Any]) -> str:
    """The report of a run a failing server stopped: why, then what it measured before (no verdict)."""
    part = doc["partial"]
    lines = [f"# Serving overhead, PARTIAL: {doc['model']} ({doc['created']})", "",
             f"**Partial result**: the run stopped during {part['stopped_during']}: {part['reason']}. Measured: "
             f"{', '.join(part['measured'])}; not measured: {', '.join(part['not_measured']) or 'nothing'}. No "
             "verdict: the systems were not all measured side by side.", "", *_setup_lines(doc)]
    if s1 := doc.get("single_stream"):
        lines += ["", "| system | p50 at concurrency 1 |", "|---|---|",
                  *(f"| {k} | {v['latency_ms']['p50']:.1f} ms |" for k, v in s1.items())]
    return "\n".join(lines + _cold_start_lines(doc)) + "\n"


def markdown(doc: dict[str, Any]) -> str:
    if doc.get("partial"):
        return partial_markdown(doc)
    v = doc["verdict"]
    s1, sat, bare = doc["single_stream"], doc["saturation"], doc["bare_saturation"]
    p50 = {k: s1[k]["latency_ms"]["p50"] for k in s1}
    ort_sat = sat["vitc-onnxruntime"]
    layouts = bare.get("onnxruntime_layouts", {})
    rows = [
        ("bare onnxruntime, batch 1 / at saturation the better of vitc's layout "
         f"({layouts.get('streams', '?')}) and one session ({layouts.get('one_session', '?')})",
         f"{p50['bare-onnxruntime']:.1f} ms",
         f"{bare['onnxruntime_ips']:.1f} img/s (batch {bare['onnxruntime_batch']})"),
        ("hand-written FastAPI + onnxruntime server (benchmarks/naive_server.py)", f"{p50['naive']:.1f} ms",
         f"{sat['naive']['throughput_rps']:.1f} req/s"),
        ("**vitc, onnxruntime**", f"**{p50['vitc-onnxruntime']:.1f} ms**",
         f"**{ort_sat['throughput_rps']:.1f} req/s** (mean batch {ort_sat.get('mean_batch') or 0:.1f})"),
        ("vitc, OpenVINO", f"{p50['vitc-openvino']:.1f} ms", f"{sat['vitc-openvino']['throughput_rps']:.1f} req/s"),
        ("OpenVINO benchmark_app on the same IR (throughput hint, no HTTP, no decoding)", "–", _reference_cell(bare)),
    ]
    lines = [
        f"# Serving overhead: {doc['model']} ({doc['created']})", "", *_setup_lines(doc), "",
        "| | p50 at concurrency 1 | throughput at saturation |", "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows), "",
        f"- vitc onnxruntime at concurrency 1: {v['vitc_minus_bare_ms']:+.1f} ms over the bare session "
        f"({'within' if v['within_5_ms_of_bare'] else 'more than'} 5 ms); "
        f"{'below' if v['vitc_below_naive'] else 'not below'} the hand-written server's p50.",
        f"- Saturation (median of per-round ratios, each server slice against the runtime alone right after it): "
        f"vitc onnxruntime = {v['onnxruntime_fraction_of_bare']:.2f} of the bare loop at the same batch "
        f"(rounds {_span(bare['onnxruntime_round_ratios'])}); vitc OpenVINO = "
        + (f"{v['openvino_fraction_of_benchmark_app']:.2f} of benchmark_app "
           f"(rounds {_span(bare['openvino_round_ratios'])})."
           if v["openvino_fraction_of_benchmark_app"] is not None else "not compared: benchmark_app gave no figure."),
        *_cpu_lines(sat, bare),
        "", "Where vitc's time goes at concurrency 1 (Server-Timing, medians in ms):", "",
        "| stage | onnxruntime | OpenVINO |", "|---|---|---|",
    ]
    for stage in ("receive", "decode", "queue", "compute", "encode", "total"):
        cells = [f"{s1[k]['server_timing_ms'].get(stage, {}).get('p50', float('nan')):.2f}"
                 for k in ("vitc-onnxruntime", "vitc-openvino")]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    client = [p50[k] - s1[k]["server_timing_ms"].get("total", {}).get("p50", float("nan"))
              for k in ("vitc-onnxruntime", "vitc-openvino")]
    lines.append(f"| HTTP and client (outside the server's total) | {client[0]:.2f} | {client[1]:.2f} |")
    return "\n".join(lines + _cold_start_lines(doc)) + "\n"


def _backends(text: str) -> list[str]:
    """An argparse type: the compared runtimes, both of them (the report holds each against its runtime alone)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    if sorted(set(names)) != sorted(COMPARED.split(",")) or len(names) != len(COMPARED.split(",")):
        raise argparse.ArgumentTypeError(f"expected {COMPARED} (in any order), got {text!r}")
    return names


def check_bundle(bundle: Path) -> None:
    """BundleError before anything starts unless `bundle` holds a servable fp32 artifact of every compared runtime."""
    from models.bundle import BundleError, read_manifest

    manifest = read_manifest(bundle)
    for runtime in COMPARED.split(","):
        try:
            manifest.select(runtime, "fp32")
        except BundleError as exc:
            raise BundleError(f"{exc}; the overhead benchmark needs onnx-fp32 and openvino-fp32 "
                              f"(python -m export ... --targets onnx,openvino)") from None


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Check the arguments, measure, print and save the results."""
    from benchmarks.loadgen import MAX_CONCURRENCY

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="the bundle (onnx-fp32 and openvino-fp32 artifacts)")
    p.add_argument("--rounds", type=int_in(1, 1000), default=8,
                   help="alternating rounds of each system at concurrency 1 (default 8)")
    p.add_argument("--slice", type=float_in(0, MAX_SECONDS), default=1.5,
                   help="seconds per system per round at concurrency 1 (default 1.5)")
    p.add_argument("--saturation", type=float_in(0, MAX_SECONDS), default=15.0,
                   help="seconds per system at saturation (default 15)")
    p.add_argument("--saturation-rounds", type=int_in(1, 1000), default=5,
                   help="slices the saturation seconds are split into, each followed by the runtime alone (default 5)")
    p.add_argument("--concurrency", type=int_in(1, MAX_CONCURRENCY), default=16,
                   help="clients at saturation (default 16)")
    p.add_argument("--cold-starts", type=int_in(1, 100), default=3,
                   help="server starts timed to their first answer (default 3)")
    # The two CPU runtimes with a reference to hold them against: a bare session loop, OpenVINO's benchmark_app.
    p.add_argument("--backends", type=_backends, default=COMPARED.split(","), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results",
                   help="results directory (default benchmarks/results under the current directory)")
    p.add_argument("--port", type=int_in(1, 65535 - len(COMPARED.split(","))), default=None,
                   help="loopback ports of the servers it starts: N, N+1, N+2 (default: free ports)")
    args = p.parse_args(argv)
    # Path("") is the current directory: `--bundle "$B"` with B unset measured whatever bundle lies here.
    refuse_empty_paths(p, (("--bundle", args.bundle, "give the bundle directory"),
                           ("--out", args.out, "give the results directory, or omit --out")))
    # Absolute: the report records the bundle it measured for readers in any directory.
    args.bundle, args.out = Path(args.bundle).absolute(), Path(args.out)
    from models.bundle import BundleError

    try:
        check_bundle(args.bundle)
    except BundleError as exc:
        raise InputError(f"--bundle: {exc}") from None
    from benchmarks.report import out_dir_problem

    if problem := out_dir_problem(args.out):  # tried for real before minutes of measuring, not after
        raise InputError(f"--out {args.out}: {problem}")
    if args.port is not None:  # a port in use would fail a server start minutes into the run
        from benchmarks.naive_server import port_problem

        if problem := next(filter(None, map(port_problem, ports_needed(args.port, args.backends))), None):
            raise InputError(f"--port {args.port}: {problem} (it uses {args.port}.."
                             f"{ports_needed(args.port, args.backends)[-1]})")
    try:
        doc = run(args.bundle, args.rounds, args.slice, args.saturation, args.concurrency, args.cold_starts,
                  args.backends, log=lambda m: print(m, file=sys.stderr),
                  saturation_rounds=args.saturation_rounds, port=args.port)
    except ServerFailed as exc:  # every server is stopped by now
        raise stopped_run(exc, args.out) from None
    print(markdown(doc), flush=True)  # first: a write failing later loses no measurement
    return save(doc, args.out)


def stopped_run(exc: ServerFailed, out: Path) -> InputError | WorkFailed:
    """The one line for a run a server failed, what it had measured printed and saved first as a partial result (as
    benchmarks.load saves the levels before a server went away): exit 2 where the server refused its input at its
    start (a port, the bundle), else 1."""
    if exc.doc is None:
        said = f"{exc}; nothing was measured, nothing written"
    else:
        print(markdown(exc.doc), flush=True)
        save(exc.doc, out)
        said = f"{exc}; what was measured before is saved, marked partial"
    return InputError(said) if exc.code == 2 else WorkFailed(said)


def save(doc: dict[str, Any], out: Path) -> int:
    """Write <date>-<time>-<host>-overhead.json / .md (-overhead-partial for a partial result) into `out` (never over
    an earlier run's); exit code 0, or WorkFailed when they cannot be written."""
    from benchmarks.report import publish, save_failed, unused_stem
    from models.io import strict_json_bytes

    created = doc["created"][:16].replace(":", "").replace("T", "-")
    kind = "overhead-partial" if doc.get("partial") else "overhead"  # never taken for a whole run's results
    stem = out / unused_stem(out, f"{created}-{doc['environment']['host']}-{kind}", (".json", ".md"))
    files = {stem.with_suffix(".json"): strict_json_bytes(doc), stem.with_suffix(".md"): markdown(doc).encode()}
    try:
        publish(files, f"the results {stem.name} in {out}")
    except OSError as exc:  # --out was writable when the run began: the disk filled up, or a file limit
        raise save_failed(exc) from None
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
