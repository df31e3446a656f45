"""Load test of the serving stage: closed loops at concurrency 1, 4, 16 and 64 against every served model.

    python -m benchmarks.load --start                      # serves the `make demo` bundles itself, then tests
    python -m benchmarks.load --start --backend openvino --model exports/animals-vit_c
    python -m benchmarks.load --url http://127.0.0.1:8000  # a server that is already running

Each level runs `--duration` seconds after a short warm-up, with real images (PNG animals validation images,
POSTed raw to /v1/models/{name}/classify). Reported per level: p50/p90/p99 latency, throughput, the requests that
failed by kind (HTTP 503 when the queue is full, any other status, connection errors) and the mean batch size the
server formed (from its /metrics). An HTTP 200 that is not a classification is an error ("bad answer: ..."). JSON
and a PNG go to benchmarks/results/ (load-<runtime>.json and .png, or `--out X.json` and X.png; a name already
taken, either file, gets -2, -3, ...: never overwritten). Loopback addresses only; levels, duration and concurrency
are bounded. The client runs on the same CPUs as the server, so on a small machine its own cost is part of the
figures (reported too). A level in which no request succeeded exits 1 with one line naming it, after the results
are saved; so does a server that goes away during the run (killed, crashed, hung: its /metrics no longer answers
after a level): that level is marked, the levels before it are kept and the rest are listed as not run. Every GET
(the model list, /metrics) must be answered whole within 10 s and every request within 30 s: a server that trickles
its answer is given up on, not waited for. With --start the server logs to a temporary
directory that is removed after a clean run; when the server fails to start or the test against it fails, the
error line gives the server's own reason and the log is kept; `--port N` picks its port (default: a free one).
Ctrl-C, SIGTERM and SIGHUP (the terminal closed; not under nohup) stop the run with one line (exit 130 or 143): the
started server is stopped and its log directory removed, nothing is written.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import datetime as dt
import http.client
import io
import ipaddress
import json
import os
import platform
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.e2e import MAX_IMAGES, NotVitcServer, classify_endpoint, error_counts, request_bodies, served_models
from benchmarks.loadgen import MAX_CONCURRENCY, closed_loop, get
from benchmarks.report import out_dir_problem, publish, save_failed, unused_stem
from benchmarks.stats import MAX_RAW_SAMPLES, THIN_NOTE, marked, thin
from models.cli import (
    InputError,
    OneLineParser,
    WorkFailed,
    command,
    float_in,
    int_in,
    redact_secrets,
    refuse_empty_paths,
    repeated,
)
from models.io import strict_json_bytes
from models.oneline import first_line
from runtimes.registry import DEFAULT_RUNTIME

DEMO_BUNDLES = ("exports/animals-vit_c", "exports/animals-vit_p")
CONCURRENCY = (1, 4, 16, 64)
MAX_DURATION_S = 60.0
RESULTS = Path("benchmarks/results")
PROG = "python -m benchmarks.load"
# How a GET fails once the server is gone (refused, reset, timed out, cut off mid-answer); a server that answers
# with an HTTP error is caught too (urllib's HTTPError is an OSError): one shutting down answers 503.
SERVER_LOST = (OSError, http.client.HTTPException)
# Latencies kept per level in the JSON (to recompute its percentiles): all of them up to this many, else every k-th.
MAX_LEVEL_SAMPLES = MAX_RAW_SAMPLES


def backend_of(args: argparse.Namespace) -> str:
    """The backend of the server --start starts: --backend, else the registry's default (--backend is None unless
    given, so that it can be refused with --url)."""
    return args.backend or DEFAULT_RUNTIME


def loopback_url(url: str) -> str:
    """The URL without a trailing slash; ValueError unless it is http:// on a loopback address."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise ValueError(f"the load test only targets http:// on loopback addresses, got {url!r}")
    return url.rstrip("/")


def _get(url: str, api_key: str | None) -> bytes:
    """The whole answer by GET_TIMEOUT_S: a server that trickles it is given up on, not waited for."""
    return get(url, api_key)


Counters = dict[str, tuple[float, float]]


def batch_counters(url: str, api_key: str | None) -> Counters:
    """Served model name -> (batches, rows) the server has run for it so far, from its Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(_get(url + "/metrics", api_key).decode()):
        if family.name == "vitc_batch_size":
            for s in family.samples:
                kept = out.setdefault(s.labels.get("model", ""), [0.0, 0.0])
                if s.name.endswith("_count"):
                    kept[0] = s.value
                elif s.name.endswith("_sum"):
                    kept[1] = s.value
    return {model: (count, total) for model, (count, total) in out.items()}


def _lost(exc: BaseException) -> str:
    """Why a GET failed, in a few words: "Connection refused", "HTTP 503 Service Unavailable", "timed out"."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", exc)  # a URLError wraps the socket's error
    return str(getattr(reason, "strerror", None) or reason or type(reason).__name__)


def run_level(url: str, model: str, bodies: list[bytes], concurrency: int, duration: float, warmup: float,
              api_key: str | None, before: Counters) -> tuple[dict[str, Any], Counters | None]:
    """One closed-loop level: latency percentiles, throughput, errors by kind and the server's mean batch size
    (its counters `before` the level and after it); with the counters after it, which the next level starts from.
    Those are None when the server went away during the level (its /metrics no longer answers): the level keeps
    what it measured and its "problem" says so."""
    summary = closed_loop(classify_endpoint(url, model, "image/png", api_key), bodies, concurrency, duration,
                          warmup).summary()
    try:
        after, lost = batch_counters(url, api_key), None
    except SERVER_LOST as exc:
        after, lost = None, f"the server went away during this level (GET /metrics after it: {_lost(exc)})"
    b0, r0 = before.get(model, (0.0, 0.0))
    b1, r1 = (after or {}).get(model, (0.0, 0.0))
    lat = summary["latency_ms"] or {}
    return {
        "concurrency": concurrency,
        "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"),
        "throughput_rps": summary["throughput_rps"],
        "requests": summary["requests"], "ok": summary["ok"],
        "http_503": summary["errors"].get("HTTP 503", 0),
        "other_errors": {k: v for k, v in summary["errors"].items() if k != "HTTP 503"},
        "warmup_errors": summary.get("warmup_errors") or {},
        "problem": lost or _problem(summary),  # the server went away, or why nothing succeeded; else None
        # Warm-up requests are included here (the server cannot tell them apart).
        "mean_batch_size": (r1 - r0) / (b1 - b0) if b1 > b0 else None,
        "client_cpu_s": summary["client_cpu_s"],
        # The successes' latencies (n, every, kept, values; at most MAX_LEVEL_SAMPLES), to recompute the percentiles.
        "latency_samples_ms": summary["latency_samples_ms"],
    }, after


def _problem(summary: dict[str, Any]) -> str | None:
    """The load generator's line for a level in which nothing succeeded (or one made from its counts)."""
    if summary.get("problem") or summary["ok"]:
        return summary.get("problem")
    errors = summary["errors"]
    return f"no request succeeded: {error_counts(errors)}" if errors else "no request was answered"


def level_errors(level: dict[str, Any]) -> dict[str, int]:
    """Every failed request of a level by kind: the 503s and the others."""
    return {**({"HTTP 503": level["http_503"]} if level.get("http_503") else {}), **(level.get("other_errors") or {})}


def bundle_identity(info: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """What identifies a served model's build: what the server reports (weights sha256, version, the export's
    provenance) and, from its bundle directory where this run served it, the sha256 of its manifest.json (which
    lists every file's sha256) and the served artifact's files."""
    from models.bundle import MANIFEST_FILE, read_manifest
    from models.io import sha256_file

    out = {"weights_sha256": (info.get("source") or {}).get("sha256"), "version": info.get("version"),
           "provenance": info.get("provenance")}
    if path is None:  # a server started elsewhere does not say which files it loaded
        return {**out, "path": None, "manifest_sha256": None, "artifact": None}
    manifest = read_manifest(path)
    artifact = manifest.artifact(info.get("runtime", ""), info.get("precision", ""))
    return {**out, "path": str(path), "manifest_sha256": sha256_file(path / MANIFEST_FILE),
            "created": manifest.created,
            "artifact": {"id": artifact.id, "files": [f.to_dict() for f in artifact.files]} if artifact else None}


def run_load_test(url: str, concurrency: tuple[int, ...], duration: float, warmup: float, images: int,
                  api_key: str | None = None, log: Callable[[str], None] = print,
                  bundles: dict[str, Path] | None = None) -> dict[str, Any]:
    """Every served model at every concurrency level; the JSON-ready report. `bundles`: served model name -> its
    bundle directory, where known (--start), for the bundles' identity."""
    from benchmarks import machine

    models = served_models(json.loads(_get(url + "/v1/models", api_key)), url)
    counters: Counters | None = batch_counters(url, api_key)  # before any level: a server without them is refused
    bodies = request_bodies(images)
    doc: dict[str, Any] = {
        # 2: "environment" and each model's "bundle"; 3: each level's "problem" and "warmup_errors"; 4: each model's
        # "not_run" (levels left after the server went away) and "server_lost" here (the level it went away in);
        # 5: each level's "latency_samples_ms"
        "schema": "vitc-load-test", "schema_version": 5,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "url": url, "duration_s": duration, "warmup_s": warmup, "images": len(bodies),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": os.getloadavg()},
        "environment": machine.environment(None),  # library versions, git commit, CPU model and flags
        "models": [], "server_lost": None,
    }
    for m in models:
        entry = {k: m.get(k) for k in ("name", "variant", "runtime", "precision", "device", "max_batch")}
        entry["bundle"] = bundle_identity(m, (bundles or {}).get(m["name"]))
        entry["levels"], entry["not_run"] = [], []
        for c in concurrency:
            if counters is None:  # the server went away: nothing left to load
                entry["not_run"].append(c)
                continue
            log(f"{m['name']}: concurrency {c}, {duration:g}s ...")
            level, counters = run_level(url, m["name"], bodies, c, duration, warmup, api_key, counters)
            entry["levels"].append(level)
            log("  " + format_level(level))
            if counters is None:
                doc["server_lost"] = f"{m['name']} c={c}"
        doc["models"].append(entry)
    doc["machine"]["load_average_end"] = os.getloadavg()
    return doc


def _ms(v: float | None, width: int = 0) -> str:
    return "-".rjust(width) if v is None else f"{v:{width}.1f}"


def _pct(level: dict[str, Any], key: str, width: int = 0) -> str:
    """A level's percentile `key` ("p90") in ms, marked when it comes from too few successes."""
    return marked(_ms(level[f"{key}_ms"], width), key, level.get("ok") if level[f"{key}_ms"] is not None else None)


def _thin_levels(doc: dict[str, Any]) -> bool:
    """Whether some level printed a p90 or p99 from too few successes."""
    return any(lv[f"{k}_ms"] is not None and thin(k, lv.get("ok")) for m in doc["models"] for lv in m["levels"]
               for k in ("p90", "p99"))


def _errors(level: dict[str, Any]) -> str:
    """"0", or the count of failed requests and every kind: "5 (HTTP 429 ×4, ConnectionResetError ×1)"."""
    errors = level_errors(level)
    return f"{sum(errors.values())} ({error_counts(errors)})" if errors else "0"


def format_level(level: dict[str, Any]) -> str:
    """One progress line: percentiles, throughput, errors by kind, mean batch; why, when nothing succeeded."""
    batch = level["mean_batch_size"]
    return (f"c={level['concurrency']:<3} p50 {_ms(level['p50_ms'], 7)} ms  p90 {_pct(level, 'p90', 7)} ms  "
            f"p99 {_pct(level, 'p99', 7)} ms  {level['throughput_rps']:7.1f} req/s  errors {_errors(level)}  "
            f"batch {'-' if batch is None else f'{batch:.1f}'}"
            + (f"  ({level['problem']})" if level.get("problem") else ""))


def markdown(doc: dict[str, Any]) -> str:
    """The figures as a Markdown table (for the README / notes)."""
    rows = ["| model | runtime | concurrency | p50 ms | p90 ms | p99 ms | req/s | ok | errors | mean batch |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for m in doc["models"]:
        for lv in m["levels"]:
            b = lv["mean_batch_size"]
            rows.append(f"| {m['name']} | {m['runtime']} {m['precision']} | {lv['concurrency']} | "
                        f"{_ms(lv['p50_ms'])} | {_pct(lv, 'p90')} | {_pct(lv, 'p99')} | "
                        f"{lv['throughput_rps']:.0f} | {lv.get('ok', '-')} | {_errors(lv)} | "
                        f"{'-' if b is None else f'{b:.1f}'} |")
    if _thin_levels(doc):
        rows.append(f"\n{THIN_NOTE} (the ok column counts them)")
    if not_run := _not_run(doc):
        rows.append(f"\nNot run, the server having gone away during {doc['server_lost']}: {', '.join(not_run)}")
    return "\n".join(rows) + "\n"


def _not_run(doc: dict[str, Any]) -> list[str]:
    """The levels left after the server went away, as "model c=N"."""
    return [f"{m['name']} c={c}" for m in doc["models"] for c in m.get("not_run") or ()]


def failed_levels(doc: dict[str, Any]) -> str | None:
    """One line naming the levels in which no request succeeded or the server went away, and those not run after it;
    None when every level ran and had a success."""
    bad = [f"{m['name']} c={lv['concurrency']}: {lv['problem']}" for m in doc["models"] for lv in m["levels"]
           if lv.get("problem")]
    not_run = _not_run(doc)
    if not bad and not not_run:
        return None
    total = sum(len(m["levels"]) for m in doc["models"]) + len(not_run)
    return (f"{len(bad) + len(not_run)} of {total} load levels failed: " + "; ".join(bad)
            + (f"; not run after it: {', '.join(not_run)}" if not_run else ""))


def plot(doc: dict[str, Any]) -> bytes | None:
    """p50/p99 latency and throughput against concurrency, one line per model, as PNG (None without matplotlib)."""
    try:
        from models.plotting import pyplot

        plt = pyplot()
    except ImportError:
        return None
    fig = figure(doc)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def figure(doc: dict[str, Any]) -> Any:
    """The load plot's matplotlib figure: latency (log) and throughput (from 0) against concurrency."""
    from models.plotting import pyplot

    fig, (ax_lat, ax_tp) = pyplot().subplots(1, 2, figsize=(10, 4))
    levels = sorted({lv["concurrency"] for m in doc["models"] for lv in m["levels"]})
    nan = float("nan")  # a level without a success has no latency: a gap in its line
    for k, m in enumerate(doc["models"]):
        c, color = [lv["concurrency"] for lv in m["levels"]], f"C{k}"
        for key, style in (("p50_ms", "o-"), ("p99_ms", "x--")):
            ax_lat.plot(c, [nan if lv[key] is None else lv[key] for lv in m["levels"]], style, color=color,
                        label=f"{m['name']} {key[:3]}")
        ax_tp.plot(c, [lv["throughput_rps"] for lv in m["levels"]], "o-", color=color, label=m["name"])
    for ax, ylabel in ((ax_lat, "latency (ms)"), (ax_tp, "throughput (requests/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if any(lv["p50_ms"] is not None for m in doc["models"] for lv in m["levels"]):
        ax_lat.set_yscale("log")  # a log scale of nothing raises
    else:
        ax_lat.text(0.5, 0.5, "no successful requests", transform=ax_lat.transAxes, ha="center", va="center")
    ax_tp.set_ylim(bottom=0)  # from 0, as the e2e plot: a 13 % difference must not fill the panel
    fig.suptitle(f"vitc serve load test ({doc['machine']['cpus']} CPUs, client on the same machine)")
    fig.tight_layout()
    return fig


def server_problem(url: str, exc: BaseException, started: bool = False) -> str:
    """One line for a server the load test could not use: unreachable, refusing the key, or not vitc. `started`:
    the server this run started (--start), which has no other to point to."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"{url} answered HTTP {exc.code} {exc.reason}" + (" (pass --api-key)" if exc.code == 401 else "")
    if isinstance(exc, urllib.error.URLError):
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        if started:
            return f"the server started at {url} stopped answering: {reason}"
        return f"no server at {url}: {reason} (start one with `python -m serve`, or pass --start)"
    if isinstance(exc, OSError):
        return f"{url}: {exc.strerror or exc}"
    if isinstance(exc, NotVitcServer):
        return str(exc)
    if isinstance(exc, KeyError | json.JSONDecodeError):
        return f"{url} does not answer like a vitc server (GET /v1/models)"
    text = str(exc).strip()
    return f"{url}: {text.splitlines()[0] if text else type(exc).__name__}"


def build_parser() -> argparse.ArgumentParser:
    """Every option, documented."""
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="running server (loopback only)")
    p.add_argument("--start", action="store_true", help="start a server on the bundles first (and stop it after)")
    p.add_argument("--model", action="append", help=f"bundle for --start (default: {', '.join(DEMO_BUNDLES)})")
    p.add_argument("--backend", default=None, help=f"backend for --start (default {DEFAULT_RUNTIME})")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    p.add_argument("--port", type=int_in(1, 65535), default=None,
                   help="loopback port of the server --start starts (default: a free port)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--duration", type=float_in(0, MAX_DURATION_S), default=8.0,
                   help=f"seconds per level, at most {MAX_DURATION_S:g} (default 8)")
    p.add_argument("--warmup", type=float_in(0, MAX_DURATION_S, low_open=False), default=1.0,
                   help="seconds per level not counted (default 1)")
    p.add_argument("--images", type=int, default=64, help="distinct request images (default 64)")
    p.add_argument("--api-key", default=os.environ.get("VITC_API_KEY"))
    p.add_argument("--out", help="JSON path, the plot beside it as .png (default benchmarks/results/"
                                 "load-<runtime>.json); a name taken gets -2, -3, ...")
    return p


def _checked(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The target URL and the bundles to serve; ValueError on anything that would fail after the load started."""
    url = loopback_url(args.url)
    if not 1 <= min(args.concurrency) <= max(args.concurrency) <= MAX_CONCURRENCY:
        raise ValueError(f"--concurrency must be within 1..{MAX_CONCURRENCY}")
    if twice := repeated(args.concurrency):
        raise ValueError(f"--concurrency {' '.join(map(str, twice))} given more than once: give each level once")
    if not 1 <= args.images <= MAX_IMAGES:
        raise ValueError(f"--images must be in 1..{MAX_IMAGES}, got {args.images}")
    bundles = args.model or [b for b in DEMO_BUNDLES if Path(b).is_dir()]
    if args.start:
        from serve.registry import parse_model_arg

        if not bundles:
            raise ValueError("no bundles to serve: run `make demo` first or pass --model")
        for spec in bundles:
            if not (path := parse_model_arg(spec)[1]).is_dir():
                raise ValueError(f"--model {spec}: bundle directory not found: {path}")
    if args.port is not None and not args.start:
        raise ValueError("--port applies to --start only (the server it starts); give --url for a running one")
    started_only = [flag for flag, given in (("--model", args.model), ("--backend", args.backend is not None),
                                             ("--server-arg", args.server_arg)) if given]
    if started_only and not args.start:  # a running server tests every model it serves, as it serves them
        one = len(started_only) == 1
        raise ValueError(f"{', '.join(started_only)} appl{'ies' if one else 'y'} to --start only (the server it "
                         "starts); a running server at --url is tested on every model it serves")
    out = args.out or RESULTS / f"load-{backend_of(args)}.json"
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a .json path")
    if out.suffix.lower() != ".json":  # the plot goes beside it as .png: `--out X.png` would be replaced by the plot
        raise ValueError(f"--out {out} must end in .json (the plot is written beside it as .png)")
    if problem := out_dir_problem(out.parent):
        raise ValueError(f"--out {out}: {problem}; give a .json path in a writable directory")
    return url, bundles


def _measure(args: argparse.Namespace, url: str, bundles: dict[str, Path] | None = None) -> dict[str, Any]:
    """The load test against `url`, progress on stderr."""
    return run_load_test(url, tuple(args.concurrency), args.duration, args.warmup, args.images, args.api_key,
                         log=lambda msg: print(msg, file=sys.stderr), bundles=bundles)


def served_names(specs: list[str]) -> dict[str, Path]:
    """Served model name -> bundle directory for `--model [NAME=]PATH` arguments (the server's naming rule)."""
    from models.bundle import read_manifest
    from serve.registry import parse_model_arg

    out = {}
    for spec in specs:
        name, path = parse_model_arg(spec)
        out[name or read_manifest(path).name] = path
    return out


def _measure_started(args: argparse.Namespace, bundles: list[str]) -> dict[str, Any]:
    """Serve `bundles` on a loopback port, run the load test, stop the server; InputError when either fails.

    The server's log lives in a temporary directory, removed once the run succeeded; when the server fails to
    start, or the test against it fails, the log is kept and named (it holds the server's side of the story)."""
    from serve.launch import start

    log_dir = Path(tempfile.mkdtemp(prefix="vitc-load-"))
    log_path = log_dir / "server.log"
    server_args = [a for b in bundles for a in ("--model", b)] + ["--backend", backend_of(args),
                                                                  "--no-access-log", *args.server_arg]
    if args.port is not None:  # after --server-arg: the flag of this tool decides
        server_args += ["--port", str(args.port)]
    keep_log = False
    try:
        try:
            server = start(server_args, log_path, {"VITC_API_KEY": args.api_key} if args.api_key else None)
        except RuntimeError as exc:  # its first line: how it ended and the server's own last error
            keep_log = True
            raise InputError(f"the server did not start: {first_line(exc)} (log: {log_path})") from None
        try:
            doc = _measure(args, server.url, served_names(bundles))
        except (OSError, ValueError, KeyError) as exc:
            keep_log = True
            raise InputError(f"{server_problem(server.url, exc, started=True)} (server log: {log_path})") from None
        finally:
            exit_code = server.stop()
        if exit_code != 0:  # the figures stand; say where to look for the server's trouble
            keep_log = True
            print(f"{PROG}: warning: the server exited with code {exit_code} (log: {log_path})", file=sys.stderr)
        doc["server"] = {"args": redact_secrets(server_args), "exit_code": exit_code}
        return doc
    finally:
        if not keep_log:  # a clean run, or one abandoned with Ctrl-C
            shutil.rmtree(log_dir, ignore_errors=True)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Check the arguments, run the load test (starting a server with --start), print and write the report."""
    p = build_parser()
    args = p.parse_args(argv)
    # Path("") is the current directory: an empty --out was called "a directory", a blank one wrote a report named
    # " " here, and an empty --model (or NAME=) reached the started server before it was refused.
    paths = [("--out", args.out, "give a .json path, or omit --out")]
    if args.model:
        from serve.settings import model_path_text

        paths += [("--model", model_path_text(spec), "give a bundle directory as PATH or NAME=PATH")
                  for spec in args.model]
    refuse_empty_paths(p, paths)
    args.out = args.out and Path(args.out)
    try:
        url, bundles = _checked(args)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return _run(args, url, bundles)


def _run(args: argparse.Namespace, url: str, bundles: list[str]) -> int:
    """Run the load test (starting a server with --start), print and write the report; the exit code."""
    if args.start:
        doc = _measure_started(args, bundles)
    else:
        try:
            doc = _measure(args, url)
        except (OSError, ValueError, KeyError) as exc:  # refused, timed out, 401, or not a vitc server
            raise InputError(server_problem(url, exc)) from None
    runtime = doc["models"][0]["runtime"] if doc["models"] else backend_of(args)
    wanted = args.out or RESULTS / f"load-{runtime}.json"
    print(markdown(doc))  # first: a disk that fills up loses the files, not the figures
    # Never over an earlier run's results or a file the user keeps: the JSON and its plot take the first free stem.
    out = wanted.with_name(unused_stem(wanted.parent, wanted.stem, (".json", ".png")) + ".json")
    png = plot(doc)  # rendered before anything is written: a Ctrl-C meanwhile leaves nothing
    files = {out: strict_json_bytes(doc), **({out.with_suffix(".png"): png} if png is not None else {})}
    try:
        written = publish(files, f"the results {out.stem} in {out.parent}")
    except OSError as exc:  # --out was writable when the test began: the disk filled up, or a file limit
        raise save_failed(exc) from None
    taken = f" ({wanted.stem}.json or .png exists: never overwritten)" if out != wanted else ""
    print(f"wrote {' and '.join(map(str, written))}{taken}", file=sys.stderr)
    if failed := failed_levels(doc):  # saved first: the errors are the finding
        raise WorkFailed(failed)
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
