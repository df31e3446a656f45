"""End-to-end mode of the latency benchmark: drive a running server and compare it with the bare runtime.

Scenarios in the spirit of MLPerf: SingleStream = closed loop at concurrency 1; Server = Poisson arrivals at a
target rate; Offline = the closed loop at the highest concurrency (saturation throughput). Requests are real
images: animals validation images as PNG (or JPEG, optionally resized, e.g. 224x224 for a 1GF model), POSTed raw
to /v1/models/{name}/classify. Every answer's Server-Timing header is kept, so each level reports where the
server's time went (receive, decode, queue, compute, encode). When the served bundle is given, the same artifact is
opened in-process as the server opened it (the started server's own settings, else options inferred from the
execution it reports; any difference in what runs is reported) and called as the server calls a lone request (on a
pool thread; a lone call takes onnxruntime's all-core latency session in both). At concurrency 1 the bare call and
the server take turns in slices, so the server's overhead is a difference of two medians measured under the same
machine conditions; the bare runtime's preprocessing and batch throughput are timed after.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from benchmarks import machine
from benchmarks.loadgen import Client, Endpoint, closed_loop, open_loop
from benchmarks.stats import summarize
from models.io import atomic_write_bytes, atomic_write_json
from runtimes.registry import DEFAULT_RUNTIME

SCHEMA = "vitc-e2e-benchmark"
MAX_IMAGES = 1024
OPEN_LOOP_FRACTION = 0.7  # default Poisson rate, as a fraction of the best closed-loop throughput


@dataclass(frozen=True)
class E2EConfig:
    """A server to drive and how hard."""

    url: str  # a running server, or "start": serve `bundle` on a loopback port for the run
    model: str | None = None
    backend: str = DEFAULT_RUNTIME  # the backend of a started server
    concurrency: tuple[int, ...] = (1, 4, 16)
    rate: float | None = None
    duration: float = 15.0
    warmup: float = 2.0
    bundle: Path | None = None
    images: int = 64
    image_format: str = "png"  # png | jpeg
    image_size: int | None = None  # resize to size x size; None: the images' own size
    server_args: tuple[str, ...] = ()  # extra `python -m serve` flags for a started server (--device cuda ...)
    api_key: str | None = None
    quick: bool = False
    argv: tuple[str, ...] = ()


def e2e_config(args: Any, argv: list[str]) -> E2EConfig:
    """CLI arguments -> E2EConfig; ValueError on bad values (non-http URL, non-positive rate or duration)."""
    parts = urllib.parse.urlsplit(args.http)
    if args.http == "start":
        if args.bundle is None:
            raise ValueError("--http start needs --bundle (the bundle to serve)")
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--http needs an http(s)://host[:port] URL or 'start', got {args.http!r}")
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 15.0)
    if duration <= 0 or (args.rate is not None and args.rate <= 0):
        raise ValueError("--duration and --rate must be positive")
    if max(args.concurrency) > 256:
        raise ValueError("--concurrency is limited to 256")
    if args.bundle is not None and not args.bundle.is_dir():
        raise ValueError(f"--bundle {args.bundle} is not a directory")
    if args.image_size is not None and not 8 <= args.image_size <= 4096:
        raise ValueError(f"--image-size must be in 8..4096, got {args.image_size}")
    server_args = tuple(shlex.split(args.server_args or ""))
    if server_args and args.http != "start":
        raise ValueError("--server-args applies to --http start only")
    return E2EConfig(url=args.http.rstrip("/"), model=args.model, backend=args.runtime or DEFAULT_RUNTIME,
                     concurrency=tuple(args.concurrency),
                     rate=args.rate, duration=duration, warmup=0.5 if args.quick else 2.0, bundle=args.bundle,
                     images=16 if args.quick else 64, image_format=args.image_format, image_size=args.image_size,
                     server_args=server_args, api_key=args.api_key, quick=args.quick,
                     argv=("python", "benchmarks/latency.py", *argv))


def _get_json(url: str, api_key: str | None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ValueError(f"GET {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"cannot reach the server at {url}: {getattr(exc, 'reason', exc)}") from None


def model_info(cfg: E2EConfig) -> dict[str, Any]:
    """The served model's description (GET /v1/models/{name}); the first served model when none is named."""
    name = cfg.model
    if name is None:
        models = _get_json(f"{cfg.url}/v1/models", cfg.api_key).get("models") or []
        if not models:
            raise ValueError(f"the server at {cfg.url} serves no models")
        name = models[0]["name"]
    return _get_json(f"{cfg.url}/v1/models/{urllib.parse.quote(name)}", cfg.api_key)


def request_bodies(n: int, seed: int = 0, fmt: str = "png", size: int | None = None) -> list[bytes]:
    """`n` animals validation images (deterministic subset) as PNG or JPEG (quality 90), resized to size x size."""
    from PIL import Image

    from data.datasets import load_dataset

    val = load_dataset("animals", "val").readable_subset(min(n, MAX_IMAGES), seed=seed).images
    bodies = []
    for i in range(len(val)):
        img = val.image(i).convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG") if fmt == "png" else img.save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())
    return bodies


def started_options(serve_args: list[str]) -> runtimes.BackendOptions:
    """The BackendOptions of the models of a `python -m serve` started with `serve_args`: its settings (flags over
    VITC_* variables, which the child inherits) turned into options as serve/registry.py `load_model` does."""
    from serve.__main__ import build_parser
    from serve.settings import Settings

    s = Settings(**vars(build_parser().parse_args(serve_args)))
    return runtimes.BackendOptions(device=s.device, threads=s.threads, parallel=s.parallel, hint=s.openvino_hint,
                                   compile=s.compile, channels_last=s.channels_last)


def reported_options(info: dict[str, Any]) -> list[runtimes.BackendOptions]:
    """Options that may reproduce a server whose settings are unknown, from what it reports running (its streams,
    threads, torch compilation): the runtime's default threads first, then the server's effective count."""
    run = info.get("execution") or {}
    base = runtimes.BackendOptions(device=info.get("device", "cpu"), parallel=run.get("parallelism"),
                                   compile=bool(run.get("compiled")), channels_last=run.get("channels_last"),
                                   buckets=tuple(run["batch_buckets"]) if run.get("batch_buckets") else None)
    threads = run.get("threads_effective")
    return [base, dataclasses.replace(base, threads=threads)] if isinstance(threads, int) and threads > 0 else [base]


def execution_differences(server: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    """"key: server X, bare Y" for every fact of the two execution reports that differs (timings aside)."""
    server, bare = (json.loads(json.dumps(d, default=str)) for d in (server, bare))
    keys = [k for k in dict.fromkeys([*server, *bare]) if not k.endswith("seconds")]
    return [f"{k}: server {server.get(k)!r}, bare {bare.get(k)!r}" for k in keys if server.get(k) != bare.get(k)]


def bundle_mismatch(bundle: Path, info: dict[str, Any]) -> str | None:
    """Why `bundle` is not the model the server reports serving (its variant or its weights' sha256), or None:
    the bare runtime must run the served model for the overhead to be a like-for-like comparison."""
    from models.bundle import read_manifest

    manifest = read_manifest(bundle)
    served = {"variant": info.get("variant"), "weights sha256": (info.get("source") or {}).get("sha256")}
    own = {"variant": manifest.model, "weights sha256": manifest.source.sha256}
    differs = [f"{k} {served[k]!r} served, {own[k]!r} in the bundle" for k in own if served[k] != own[k]]
    if not differs:
        return None
    return (f"--bundle {bundle} is not the model the server serves as {info.get('name')!r} ({'; '.join(differs)}); "
            "give the served bundle (or --model NAME for the served model that bundle is)")


def open_bare(bundle: Path, info: dict[str, Any], serve_args: list[str] | None) -> tuple[Any, dict[str, Any]]:
    """The served artifact opened in-process as the server opened it: with its settings' options when this run
    started it, else with options inferred from its execution report (the first whose report matches). Returns
    (backend, what it is: runtime, precision, cold start, options, and how its execution differs, if at all)."""
    from models.bundle import read_manifest

    manifest = read_manifest(bundle)
    candidates = [started_options(serve_args)] if serve_args is not None else reported_options(info)
    # The device it reports: a repository model's config.pbtxt may put it on the CPU whatever --device says.
    candidates = [dataclasses.replace(o, device=info.get("device") or o.device) for o in candidates]
    for options in candidates:
        t0 = time.perf_counter()
        backend = runtimes.open_backend(bundle, manifest, info["runtime"], info.get("precision"), options)
        cold = time.perf_counter() - t0
        differs = execution_differences(info.get("execution") or {}, backend.describe())
        if not differs or options is candidates[-1]:
            break
        backend.close()
    return backend, {
        "runtime": info["runtime"], "precision": backend.precision, "cold_start_s": cold,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if v is not None},
        "options_from": "the started server's settings" if serve_args is not None
        else "the server's execution report (its settings are unknown)",
        "execution": backend.describe(), "differs": differs,
    }


def _timed(call: Callable[[int], bool], seconds: float) -> list[float]:
    """Seconds of each successful call(i), i = 0, 1, ..., until `seconds` have passed (at least one call)."""
    out: list[float] = []
    end, i = time.perf_counter() + seconds, 0
    while True:
        t = time.perf_counter()
        ok = call(i)
        done = time.perf_counter()
        if ok:
            out.append(done - t)
        i += 1
        if done >= end:
            return out


def single_stream(endpoint: Endpoint, bodies: list[bytes], infer: Callable[[np.ndarray], Any],
                  xs: list[np.ndarray], rounds: int, slice_s: float) -> dict[str, Any]:
    """Concurrency 1, the bare call and the server taking turns in slices (the order flips each round), so the
    drift of a shared machine hits both alike: each one's latency (ms), the server's stages, the round medians."""
    client = Client(endpoint)
    stages: list[dict[str, float]] = []
    errors: dict[str, int] = {}

    def post(i: int) -> bool:
        err = client.post(bodies[i % len(bodies)])
        if err is not None:
            errors[err] = errors.get(err, 0) + 1
        elif client.timing:
            stages.append(client.timing)
        return err is None

    def bare(i: int) -> bool:
        infer(xs[i % len(xs)])
        return True

    bare_s: list[float] = []
    served_s: list[float] = []
    medians: list[list[float]] = []
    # The server's batcher calls a lone request's infer on a pool thread: so does the bare runtime here.
    with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
        try:
            pool.submit(_timed, bare, min(0.5, slice_s)).result()  # warm-up, not counted
            _timed(post, min(0.5, slice_s))
            stages.clear()
            errors.clear()
            timed = {"bare": lambda: pool.submit(_timed, bare, slice_s).result(),
                     "server": lambda: _timed(post, slice_s)}
            for r in range(rounds):
                times = {side: timed[side]() for side in (("bare", "server") if r % 2 == 0 else ("server", "bare"))}
                bare_s += times["bare"]
                served_s += times["server"]
                if times["server"]:
                    medians.append([float(np.median(times[k])) * 1e3 for k in ("bare", "server")])
        finally:
            client.close()
    keys = dict.fromkeys(k for t in stages for k in t)
    return {
        "rounds": rounds, "slice_s": slice_s, "errors": errors, "round_p50_ms": medians,
        "bare_ms": summarize([t * 1e3 for t in bare_s]),
        "server_ms": summarize([t * 1e3 for t in served_s]) if served_s else None,
        "server_timing_ms": {k: summarize([t[k] for t in stages if k in t]) for k in keys},
    }


def bare_runtime(backend: Any, spec: Any, bodies: list[bytes], seconds: float, max_batch: int) -> dict[str, Any]:
    """The bare runtime's preprocessing (`spec`) per image and its throughput at batch 1, 8 and `max_batch`."""
    from benchmarks.measure import input_pool, time_calls
    from serve.imaging import prepare

    prep = []
    for body in bodies * max(1, 50 // len(bodies)):
        t = time.perf_counter()
        prepare(body, spec, max_pixels=40_000_000)
        prep.append(time.perf_counter() - t)
    shape = tuple(prepare(bodies[0], spec, max_pixels=40_000_000).shape[1:])
    throughput = {}
    for batch in sorted({1, min(8, max_batch), max_batch}):  # a bundle exported for fewer rows: up to those
        pool = input_pool(batch, shape)
        est = float(np.median(time_calls(backend.infer, pool, 2)))
        reps = int(np.clip(seconds / 4 / est, 3, 200))
        throughput[str(batch)] = batch / float(np.median(time_calls(backend.infer, pool, reps)))
    best = max(throughput, key=throughput.get)
    return {"preprocess_ms": summarize([t * 1e3 for t in prep]), "throughput_ips_by_batch": throughput,
            "best_throughput_ips": throughput[best], "best_batch": int(best),
            "note": "throughput: one caller, back-to-back batches (no concurrent infer calls)"}


def run_e2e(cfg: E2EConfig, log: Any = None) -> dict[str, Any]:
    """Closed loops at each concurrency, then an open Poisson loop; with the bare runtime when a bundle is given.

    With url "start", a server (`python -m serve`, default settings, the chosen backend) is started on the
    bundle first and stopped afterwards.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if cfg.url != "start":
        return _run_e2e(cfg, log, None)
    import shutil
    import tempfile

    from serve.launch import start

    log_path = Path(tempfile.mkdtemp(prefix="vitc-e2e-")) / "server.log"
    serve_args = ["--model", str(cfg.bundle), "--backend", cfg.backend, "--no-access-log", *cfg.server_args]
    keep_log = False
    try:  # whatever ends the run (an error, Ctrl-C, SIGTERM), the server is stopped and its log directory removed
        try:
            server = start(serve_args, log_path, {"VITC_API_KEY": cfg.api_key} if cfg.api_key else None)
        except RuntimeError as exc:  # the log is kept: it holds the server's side of the story
            keep_log = True
            raise ValueError(f"the server did not start: {str(exc).splitlines()[0]} (log: {log_path})") from None
        try:
            doc = _run_e2e(dataclasses.replace(cfg, url=server.url), log, serve_args)
        finally:
            server.stop()
    finally:
        if not keep_log:
            shutil.rmtree(log_path.parent, ignore_errors=True)
    doc["server_started"] = {"backend": cfg.backend, "bundle": str(cfg.bundle),
                             "settings": " ".join(cfg.server_args) or "defaults"}
    return doc


def _run_e2e(cfg: E2EConfig, log: Any, serve_args: list[str] | None) -> dict[str, Any]:
    """The run against a server at cfg.url; `serve_args`: how it was started (None: not by this run)."""
    info = model_info(cfg)
    if cfg.bundle is not None and (problem := bundle_mismatch(cfg.bundle, info)):
        raise ValueError(problem)  # before anything is measured
    name = info["name"]
    endpoint = Endpoint(f"{cfg.url}/v1/models/{urllib.parse.quote(name)}/classify", f"image/{cfg.image_format}",
                        cfg.api_key)
    bodies = request_bodies(cfg.images, fmt=cfg.image_format, size=cfg.image_size)
    env = machine.environment(None)
    doc: dict[str, Any] = {
        # 2: "single_stream" (the bare runtime and the server timed in turns at concurrency 1), which the overhead's
        # c1 figures and bare "infer_b1_ms" now come from; bare "options", "execution" and "differs".
        "schema": SCHEMA, "schema_version": 2,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": env["host"],
        "argv": list(cfg.argv), "url": cfg.url,
        "server_model": {k: v for k, v in info.items() if k not in ("labels",)},
        "config": {"concurrency": list(cfg.concurrency), "rate": cfg.rate, "duration_s": cfg.duration,
                   "warmup_s": cfg.warmup, "images": len(bodies), "image_format": cfg.image_format,
                   "image_size": cfg.image_size, "image_bytes_mean": float(np.mean([len(b) for b in bodies]))},
        "environment": env, "bare": None, "single_stream": None, "closed": [], "open": None,
    }
    if cfg.bundle is not None:
        from models.bundle import read_manifest
        from serve.imaging import prepare

        log(f"bare runtime: {info['runtime']} {info.get('precision')} from {cfg.bundle}, opened as the server's ...")
        spec = read_manifest(cfg.bundle).preprocessing
        backend, bare = open_bare(cfg.bundle, info, serve_args)
        try:
            rounds, slice_s = (4, 0.25) if cfg.quick else (8, 1.0)
            log(f"concurrency 1, the bare runtime and the server taking turns, {rounds} rounds ...")
            xs = [prepare(b, spec, max_pixels=40_000_000) for b in bodies[:4]]
            doc["single_stream"] = single_stream(endpoint, bodies, backend.infer, xs, rounds, slice_s)
            bare.update(bare_runtime(backend, spec, bodies, 2.0 if cfg.quick else 8.0,
                                     int(info.get("max_batch") or backend.max_batch)))
        finally:
            backend.close()
        doc["bare"] = {**bare, "infer_b1_ms": doc["single_stream"]["bare_ms"]}
    for c in cfg.concurrency:
        log(f"closed loop, concurrency {c}, {cfg.duration:g} s ...")
        doc["closed"].append(closed_loop(endpoint, bodies, c, cfg.duration, cfg.warmup).summary())
    best = max((r["throughput_rps"] for r in doc["closed"]), default=0.0)
    rate = cfg.rate or max(1.0, OPEN_LOOP_FRACTION * best)
    log(f"open loop (Poisson), {rate:.1f} requests/s, {cfg.duration:g} s ...")
    doc["open"] = open_loop(endpoint, bodies, rate, cfg.duration, warmup_s=cfg.warmup).summary()
    doc["overhead"] = overhead(doc)
    doc["environment"]["load_average_end"] = machine.load_average()
    return doc


def overhead(doc: dict[str, Any]) -> dict[str, Any] | None:
    """Server vs bare runtime: extra latency at concurrency 1 (the two timed in turns) and saturation throughput as
    a fraction of the bare runtime's best."""
    bare, single = doc.get("bare"), doc.get("single_stream") or {}
    c1 = next((r for r in doc["closed"] if r["concurrency"] == 1 and r["latency_ms"]), None)
    best = max(doc["closed"], key=lambda r: r["throughput_rps"], default=None)
    if not bare or best is None:
        return None
    out: dict[str, Any] = {
        "saturation_rps": best["throughput_rps"], "saturation_concurrency": best["concurrency"],
        "bare_best_ips": bare["best_throughput_ips"], "bare_best_batch": bare["best_batch"],
        "saturation_fraction_of_bare": best["throughput_rps"] / bare["best_throughput_ips"],
    }
    if single.get("server_ms"):
        p50, infer, prep = single["server_ms"]["p50"], single["bare_ms"]["p50"], bare["preprocess_ms"]["p50"]
        out.update(c1_p50_ms=p50, bare_infer_b1_p50_ms=infer, bare_preprocess_p50_ms=prep,
                   server_compute_p50_ms=(single["server_timing_ms"].get("compute") or {}).get("p50"),
                   c1_overhead_ms=p50 - infer, c1_overhead_beyond_preprocess_ms=p50 - infer - prep,
                   c1_rounds=single["rounds"], c1_rps=c1["throughput_rps"] if c1 else None,
                   bare_b1_ips=1e3 / infer)
    return out


def _rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in [*doc["closed"], doc["open"]]:
        lat = r["latency_ms"] or {}
        level = f"c={r['concurrency']}" if r["mode"] == "closed" else f"Poisson {r['target_rate']:.1f}/s"
        rows.append([r["mode"], level, f"{r['throughput_rps']:.1f}",
                     *(f"{lat[k]:.2f}" if lat else "-" for k in ("p50", "p90", "p99")),
                     str(r["ok"]), f"{sum(r['errors'].values())} ({r['error_rate']:.1%})", f"{r['client_cpu_s']:.1f}"])
    return rows


E2E_HEADER = ["mode", "level", "req/s", "p50 ms", "p90 ms", "p99 ms", "ok", "errors", "client CPU s"]


def format_e2e(doc: dict[str, Any]) -> str:
    """Terminal table plus the overhead lines."""
    rows = [E2E_HEADER, *_rows(doc)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(E2E_HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines + overhead_lines(doc))


def overhead_lines(doc: dict[str, Any]) -> list[str]:
    """Human sentences for the server-vs-bare comparison."""
    o, bare = doc.get("overhead"), doc.get("bare")
    if not o:
        return ["(no --bundle: bare-runtime comparison not run)"]
    lines = [f"bare {bare['runtime']} {bare['precision']}: infer b1 p50 {bare['infer_b1_ms']['p50']:.2f} ms, "
             f"preprocess p50 {bare['preprocess_ms']['p50']:.2f} ms, best {bare['best_throughput_ips']:.1f} img/s "
             f"at batch {bare['best_batch']}"]
    if "options_from" in bare:  # results written before the bare runtime mirrored the server do not say
        lines.append(f"bare runtime opened with options from {bare['options_from']}; "
                     + (f"its execution differs from the server's: {'; '.join(bare['differs'])}" if bare["differs"]
                        else "it runs as the server reports running (same execution report)"))
    if "c1_p50_ms" in o:
        compute = o.get("server_compute_p50_ms")
        how = f"bare runtime and server timed in turns, {o['c1_rounds']} rounds" if "c1_rounds" in o else "closed loop"
        lines.append(f"server overhead at concurrency 1 ({how}): "
                     f"p50 {o['c1_p50_ms']:.2f} ms vs bare inference {o['bare_infer_b1_p50_ms']:.2f} ms: "
                     f"{o['c1_overhead_ms']:+.2f} ms ({o['c1_overhead_beyond_preprocess_ms']:+.2f} ms beyond "
                     "preprocessing)" + (f"; the server's own compute p50 {compute:.2f} ms" if compute else ""))
    lines.append(f"saturation: {o['saturation_rps']:.1f} req/s at concurrency {o['saturation_concurrency']} = "
                 f"{o['saturation_fraction_of_bare']:.0%} of the bare runtime's {o['bare_best_ips']:.1f} img/s")
    return lines


def markdown_e2e(doc: dict[str, Any], plots: list[str] = ()) -> str:
    """The end-to-end report as Markdown."""
    m, env = doc["server_model"], doc["environment"]
    rows = _rows(doc)
    table = ["| " + " | ".join(E2E_HEADER) + " |", "|" + "---|" * len(E2E_HEADER)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    la = "/".join(f"{x:.2f}" for x in env.get("load_average") or [])
    parts = [
        f"# End-to-end benchmark: {m['name']} ({m.get('variant')}, {m.get('runtime')} {m.get('precision')}) "
        f"at {doc['url']}",
        "",
        f"- {doc['created']}, host {doc['host']}, CPU {env['cpu']['model']} ({env['cpu'].get('usable_cpus')} CPUs), "
        f"load average at start {la}; client and server share the machine",
        f"- Command: `{' '.join(doc['argv'])}`",
        f"- Requests: {doc['config']['images']} {doc['config'].get('image_format', 'png').upper()} animals val "
        f"images{_size_note(doc['config'].get('image_size'))} (mean {doc['config']['image_bytes_mean']:.0f} bytes), "
        f"raw body to /v1/models/{m['name']}/classify; {doc['config']['duration_s']:g} s per level after "
        f"{doc['config']['warmup_s']:g} s warm-up",
        "",
        *table,
        "",
        *stage_table(doc),
        *(f"- {line}" for line in overhead_lines(doc)),
        "",
        *(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(parts) + "\n"


def _size_note(size: int | None) -> str:
    return f" resized to {size}x{size}" if size else ""


def stage_table(doc: dict[str, Any]) -> list[str]:
    """Where the server's time went per load level: Server-Timing medians (ms) per stage, as Markdown lines."""
    levels = [r for r in [*doc["closed"], doc["open"]] if r and r.get("server_timing_ms")]
    stages = list(dict.fromkeys(k for r in levels for k in r["server_timing_ms"]))
    if not levels:
        return []
    lines = ["Where the server's time goes (Server-Timing, p50 ms per stage; total = server side, the rest of the "
             "client's p50 is the network and the client):", "",
             "| level | client p50 | " + " | ".join(stages) + " |", "|" + "---|" * (len(stages) + 2)]
    for r in levels:
        level = f"c={r['concurrency']}" if r["mode"] == "closed" else f"Poisson {r['target_rate']:.1f}/s"
        cells = [f"{r['server_timing_ms'][k]['p50']:.2f}" if k in r["server_timing_ms"] else "-" for k in stages]
        lines.append(f"| {level} | {r['latency_ms']['p50']:.2f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_e2e(doc: dict[str, Any], path: Path) -> Path:
    """Latency percentiles and throughput vs concurrency, with the bare runtime for reference."""
    from benchmarks.plots import batch_axis, figure, save

    fig, axes = figure(1, 2, (4.6, 3.4))
    closed = [r for r in doc["closed"] if r["latency_ms"]]
    xs = [r["concurrency"] for r in closed]
    ax = axes[0][0]
    for k, style in (("p50", "-o"), ("p90", "--s"), ("p99", ":^")):
        ax.plot(xs, [r["latency_ms"][k] for r in closed], style, label=f"server {k}")
    if doc.get("bare"):
        ax.axhline(doc["bare"]["infer_b1_ms"]["p50"], color="k", lw=0.8, label="bare infer b1 p50")
    batch_axis(ax, xs or [1])
    ax.set_yscale("log")
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("latency ms")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    ax = axes[0][1]
    ax.plot(xs, [r["throughput_rps"] for r in closed], "-o", label="server req/s")
    if doc.get("bare"):
        ax.axhline(doc["bare"]["best_throughput_ips"], color="k", lw=0.8,
                   label=f"bare best (batch {doc['bare']['best_batch']})")
    batch_axis(ax, xs or [1])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("images / s")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"{doc['server_model']['name']}: server vs bare runtime ({doc['host']})")
    return save(fig, path)


def write_e2e_reports(doc: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write <stem>-http.json / .md / .png into `out_dir`."""
    from benchmarks.report import naming, stem_name, unused_stem

    stem = unused_stem(out_dir, stem_name(doc, "-http"), (".json", ".md", ".png"))
    json_path, md_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    with naming(json_path):  # the numbers first: a disk that fills up later takes only the plot and the prose
        atomic_write_json(json_path, doc)
    written = []
    if plots:
        with naming(png_path):
            written.append(plot_e2e(doc, png_path))
    with naming(md_path):
        atomic_write_bytes(md_path, markdown_e2e(doc, [p.name for p in written]).encode())
    return [json_path, md_path, *written]
