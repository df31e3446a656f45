"""End-to-end mode of the latency benchmark: drive a running server and compare it with the bare runtime.

Scenarios in the spirit of MLPerf: SingleStream = closed loop at concurrency 1; Server = Poisson arrivals at a
target rate; Offline = the closed loop at the highest concurrency (saturation throughput). Requests are real
images: animals validation images as PNG (or JPEG, optionally resized, e.g. 224x224 for a 1GF model), POSTed raw
to /v1/models/{name}/classify; an HTTP 200 whose body is not a classification counts as an error ("bad answer:
..."), here and in the load test. Every answer's Server-Timing header is kept, so each level reports where the
server's time went (receive, decode, queue, compute, encode). When the served bundle is given, the same artifact is
opened in-process as the server opened it (the started server's own settings, else options inferred from the
execution it reports; any difference in what runs is reported) and called as the server calls a lone request (on a
pool thread; a lone call takes onnxruntime's all-core latency session in both). At concurrency 1 the bare call and
the server take turns in slices, and the overhead is paired per round (each round's server p50 minus its bare p50):
the median over the rounds with their interval, reported as not measurable where that interval is wide, negative or
straddles zero. The bare runtime's preprocessing and batch throughput are timed after, back to back and alone (a
different machine state from the turns: both figures are labelled). A torch model the server runs compiled is not
opened a second time in-process (compiling and capturing it again costs minutes and, on a GPU, a second copy of its
CUDA graphs): the reference is then the server's own compute stage, per request, from its Server-Timing.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from benchmarks import machine
from benchmarks.loadgen import Client, Endpoint, closed_loop, get, open_loop
from benchmarks.stats import MIN_CI_ROUNDS, MIN_SAMPLES_FOR, median_ci, summarize, thin
from models.cli import redact_secrets
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS
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


def e2e_config(args: Any, argv: list[str], command: Sequence[str]) -> E2EConfig:
    """CLI arguments -> E2EConfig, `command` (`python -m benchmarks.latency`, as the run was started) recorded before
    `argv`; ValueError on bad values (non-http URL, non-positive rate or duration)."""
    parts = urllib.parse.urlsplit(args.http)
    if args.http == "start":
        if args.bundle is None:
            raise ValueError("--http start needs --bundle (the bundle to serve)")
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--http needs an http(s)://host[:port] URL or 'start', got {args.http!r}")
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 15.0)
    if duration <= 0 or (args.rate is not None and args.rate <= 0):
        raise ValueError("--duration and --rate must be positive")
    if args.bundle is not None and not args.bundle.is_dir():
        raise ValueError(f"--bundle {args.bundle} is not a directory")
    if args.image_size is not None and not 8 <= args.image_size <= 4096:
        raise ValueError(f"--image-size must be in 8..4096, got {args.image_size}")
    server_args = tuple(shlex.split(args.server_args or ""))
    if server_args and args.http != "start":
        raise ValueError("--server-args applies to --http start only")
    if args.runtime is not None and args.http != "start":  # a running server serves with the runtime it was given
        raise ValueError("--runtime applies to --http start only (the backend of the server it starts); a running "
                         "server's runtime is its own")
    return E2EConfig(url=args.http.rstrip("/"), model=args.model, backend=args.runtime or DEFAULT_RUNTIME,
                     concurrency=tuple(args.concurrency),
                     rate=args.rate, duration=duration, warmup=0.5 if args.quick else 2.0, bundle=args.bundle,
                     images=16 if args.quick else 64, image_format=args.image_format, image_size=args.image_size,
                     server_args=server_args, api_key=args.api_key, quick=args.quick,
                     argv=(*command, *redact_secrets(argv)))


class NotVitcServer(ValueError):
    """A server whose answers do not have the shape of vitc's /v1 API (KServe v1, another tool, a proxy's page)."""


_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _kind(value: Any) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def _named(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str) and bool(entry["name"])


def served_models(doc: Any, url: str) -> list[dict[str, Any]]:
    """The model entries of a GET /v1/models answer from the server at `url`, checked once for the load test and the
    end-to-end mode alike: NotVitcServer unless it is {"models": [{"name": ...}, ...]}, ValueError when it is empty."""
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(doc, dict):
        got = f"a JSON {_kind(doc)}"
    elif not isinstance(models, list):
        got = 'an object without a "models" list' if models is None else f'"models" as a JSON {_kind(models)}'
    elif bad := next((m for m in models if not _named(m)), None):
        got = f'a model entry without a "name": {json.dumps(bad)[:60]}'
    else:
        if not models:
            raise ValueError(f"the server at {url} serves no models")
        return models
    raise NotVitcServer(f"the server at {url} does not answer like a vitc server: GET /v1/models gave {got}, "
                        'expected {"models": [{"name": ...}, ...]}')


def classify_answer_problem(body: bytes) -> str | None:
    """Why a 200 answer of POST /v1/models/{name}/classify is not vitc's {"model", "predictions": [{"label", "index",
    "score"}, ...]}, or None. Cheap, as it runs on every answer: one small JSON parse and the first prediction."""
    try:
        doc = json.loads(body.decode())  # from str: json.loads(bytes) spends as long again detecting the encoding
    except ValueError:  # an HTML page, plain text, a truncated body, bytes that are not UTF-8
        return "not JSON"
    if not isinstance(doc, dict):
        return f'a JSON {_kind(doc)}, not an object with "predictions"'
    predictions = doc.get("predictions")
    if not isinstance(predictions, list) or not predictions:  # vitc answers at least one (top_k >= 1)
        return 'no "predictions" list' if not isinstance(predictions, list) else '"predictions" is empty'
    first = predictions[0]
    if not (isinstance(first, dict) and isinstance(first.get("label"), str)
            and type(first.get("score")) in (float, int)):
        return 'a prediction without a "label" and a "score"'
    return None


def classify_endpoint(url: str, model: str, content_type: str, api_key: str | None) -> Endpoint:
    """POST /v1/models/{model}/classify of the server at `url`, each 200 answer checked to be a classification: the
    one request path of the load test and the end-to-end mode."""
    return Endpoint(f"{url}/v1/models/{urllib.parse.quote(model)}/classify", content_type, api_key,
                    check=classify_answer_problem)


def _get_json(url: str, api_key: str | None) -> Any:
    """The JSON answer of GET `url`, whole within loadgen.GET_TIMEOUT_S; ValueError (NotVitcServer) naming why not."""
    try:
        body = get(url, api_key)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"GET {url}: HTTP {exc.code}") from None
    except TimeoutError as exc:  # reached, but its answer did not come whole in time (a server that trickles it)
        raise ValueError(f"GET {url}: {exc}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"cannot reach the server at {url}: {getattr(exc, 'reason', exc)}") from None
    try:
        return json.loads(body)
    except ValueError:  # an HTML page, a proxy's error text, a truncated body
        raise NotVitcServer(f"GET {url} did not answer JSON: not a vitc server") from None


def model_info(cfg: E2EConfig) -> dict[str, Any]:
    """The served model's description (GET /v1/models/{name}); the first served model when none is named."""
    name = cfg.model
    if name is None:
        name = served_models(_get_json(f"{cfg.url}/v1/models", cfg.api_key), cfg.url)[0]["name"]
    url = f"{cfg.url}/v1/models/{urllib.parse.quote(name)}"
    info = _get_json(url, cfg.api_key)
    if not _named(info):
        raise NotVitcServer(f"the server at {cfg.url} does not answer like a vitc server: GET {url} gave a JSON "
                            f"{_kind(info)} without the model's \"name\"")
    return info


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


COMPUTE_REFERENCE = "the server's own compute stage"  # single_stream's reference without a bare runtime


def bare_skip_reason(info: dict[str, Any]) -> str | None:
    """Why the served artifact is not opened in-process for the comparison, or None (it is): a torch model the
    server runs compiled would be compiled and captured here a second time."""
    if info.get("runtime") == "torch" and (info.get("execution") or {}).get("compiled"):
        return ("the server runs torch compiled: compiling and capturing the same model again in this process would "
                "cost minutes (and on a GPU a second copy of its CUDA graphs), so the reference is the server's own "
                "compute stage (Server-Timing) of each request")
    return None


def single_stream(endpoint: Endpoint, bodies: list[bytes], infer: Callable[[np.ndarray], Any] | None,
                  xs: list[np.ndarray], rounds: int, slice_s: float) -> dict[str, Any]:
    """Concurrency 1, the bare call and the server taking turns in slices (the order flips each round), so the
    drift of a shared machine hits both alike: each one's latency (ms), the server's stages, and per round both
    medians and the server's overhead (its p50 minus the bare p50). Without `infer` the server runs alone and a
    request's overhead is its latency minus the compute stage its Server-Timing reports."""
    client = Client(endpoint)
    stages: list[dict[str, float]] = []  # one per successful request, in order (empty without Server-Timing)
    errors: dict[str, int] = {}

    def post(i: int) -> bool:
        err = client.post(bodies[i % len(bodies)])
        if err is not None:
            errors[err] = errors.get(err, 0) + 1
        else:
            stages.append(dict(client.timing))
        return err is None

    def bare(i: int) -> bool:
        infer(xs[i % len(xs)])
        return True

    bare_s: list[float] = []
    served_s: list[float] = []
    medians: list[list[float]] = []
    overheads: list[float] = []
    sides = ("bare", "server") if infer is not None else ("server",)
    # The server's batcher calls a lone request's infer on a pool thread: so does the bare runtime here.
    with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
        try:
            if infer is not None:
                pool.submit(_timed, bare, min(0.5, slice_s)).result()  # warm-up, not counted
            _timed(post, min(0.5, slice_s))
            stages.clear()
            errors.clear()
            timed = {"bare": lambda: pool.submit(_timed, bare, slice_s).result(),
                     "server": lambda: _timed(post, slice_s)}
            for r in range(rounds):
                first = len(stages)
                times = {side: timed[side]() for side in (sides if r % 2 == 0 else sides[::-1])}
                bare_s += times.get("bare", [])
                served_s += times["server"]
                if not times["server"]:
                    continue  # no request of this round succeeded: nothing to pair
                server_ms = float(np.median(times["server"])) * 1e3
                if infer is not None:
                    reference = float(np.median(times["bare"])) * 1e3
                    overhead_ms = server_ms - reference
                else:  # paired per request: its latency minus its own compute stage
                    own = [(t * 1e3, st["compute"]) for t, st in zip(times["server"], stages[first:], strict=True)
                           if "compute" in st]
                    if not own:
                        continue
                    reference = float(np.median([c for _, c in own]))
                    overhead_ms = float(np.median([t - c for t, c in own]))
                medians.append([reference, server_ms])
                overheads.append(overhead_ms)
        finally:
            client.close()
    keys = dict.fromkeys(k for t in stages for k in t)
    return {
        "rounds": rounds, "slice_s": slice_s, "reference": "bare" if infer is not None else COMPUTE_REFERENCE,
        "errors": errors, "server_ok": len(served_s), "server_requests": len(served_s) + sum(errors.values()),
        "round_p50_ms": medians, "round_overhead_ms": overheads,
        "bare_ms": summarize([t * 1e3 for t in bare_s]) if bare_s else None,
        "server_ms": summarize([t * 1e3 for t in served_s]) if served_s else None,
        "server_timing_ms": {k: summarize([t[k] for t in stages if k in t]) for k in keys},
    }


def paired_overhead(round_overhead_ms: list[float]) -> dict[str, Any]:
    """The server's overhead from its per-round values: their median, its interval (a 95 % CI from 6 rounds on,
    else the rounds' range) and whether it is measurable here: not when that interval straddles zero, lies below
    it (the server faster than what it runs), or is wider than the overhead itself."""
    if not round_overhead_ms:
        return {"c1_overhead_ms": None, "c1_overhead_interval_ms": None, "c1_overhead_interval": None,
                "c1_round_overhead_ms": [], "c1_overhead_measurable": False,
                "c1_overhead_problem": "no round had a successful request to pair with its reference"}
    n = len(round_overhead_ms)
    median = float(np.median(round_overhead_ms))
    lo, hi = median_ci(round_overhead_ms)
    problem = ("a single round" if n < 2
               else "negative: the server came out faster than what it runs" if hi <= 0
               else "its interval straddles zero" if lo <= 0
               else "its interval is wider than the overhead itself" if hi - lo > median else None)
    return {"c1_overhead_ms": median, "c1_overhead_interval_ms": [lo, hi],
            "c1_overhead_interval": "95% CI" if n >= MIN_CI_ROUNDS else f"range of {n} round{'s' if n > 1 else ''}",
            "c1_round_overhead_ms": list(round_overhead_ms), "c1_overhead_measurable": problem is None,
            "c1_overhead_problem": problem}


def bare_runtime(backend: Any, spec: Any, bodies: list[bytes], seconds: float, max_batch: int) -> dict[str, Any]:
    """The bare runtime's preprocessing (`spec`) per image and its throughput at batch 1, 8 and `max_batch`."""
    from benchmarks.measure import input_pool, time_calls
    from serve.imaging import prepare

    prep = []
    for body in bodies * max(1, 50 // len(bodies)):
        t = time.perf_counter()
        prepare(body, spec, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        prep.append(time.perf_counter() - t)
    shape = tuple(prepare(bodies[0], spec, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).shape[1:])
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
                             "settings": " ".join(redact_secrets(cfg.server_args)) or "defaults"}
    return doc


def _run_e2e(cfg: E2EConfig, log: Any, serve_args: list[str] | None) -> dict[str, Any]:
    """The run against a server at cfg.url; `serve_args`: how it was started (None: not by this run)."""
    info = model_info(cfg)
    if cfg.bundle is not None and (problem := bundle_mismatch(cfg.bundle, info)):
        raise ValueError(problem)  # before anything is measured
    name = info["name"]
    endpoint = classify_endpoint(cfg.url, name, f"image/{cfg.image_format}", cfg.api_key)
    bodies = request_bodies(cfg.images, fmt=cfg.image_format, size=cfg.image_size)
    env = machine.environment(None)
    doc: dict[str, Any] = {
        # 2: "single_stream" (the bare runtime and the server timed in turns at concurrency 1), which the overhead's
        # c1 figures and bare "infer_b1_ms" now come from; bare "options", "execution" and "differs".
        # 3: the c1 overhead is paired per round (median, interval, measurable or not); single_stream's "reference",
        # "round_overhead_ms", request counts; "bare_skipped" (a compiled torch server: its compute stage instead).
        "schema": SCHEMA, "schema_version": 3,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": env["host"],
        "argv": list(cfg.argv), "url": cfg.url,
        "server_model": {k: v for k, v in info.items() if k not in ("labels",)},
        "config": {"concurrency": list(cfg.concurrency), "rate": cfg.rate, "duration_s": cfg.duration,
                   "warmup_s": cfg.warmup, "images": len(bodies), "image_format": cfg.image_format,
                   "image_size": cfg.image_size, "image_bytes_mean": float(np.mean([len(b) for b in bodies]))},
        "environment": env, "bare": None, "single_stream": None, "closed": [], "open": None,
    }
    rounds, slice_s = (4, 0.25) if cfg.quick else (8, 1.0)
    if cfg.bundle is not None and (skip := bare_skip_reason(info)) is not None:
        log(f"bare runtime not opened: {skip}; concurrency 1, the server alone, {rounds} rounds ...")
        doc["bare_skipped"] = skip
        doc["single_stream"] = single_stream(endpoint, bodies, None, [], rounds, slice_s)
    elif cfg.bundle is not None:
        from models.bundle import read_manifest
        from serve.imaging import prepare

        log(f"bare runtime: {info['runtime']} {info.get('precision')} from {cfg.bundle}, opened as the server's ...")
        spec = read_manifest(cfg.bundle).preprocessing
        backend, bare = open_bare(cfg.bundle, info, serve_args)
        try:
            log(f"concurrency 1, the bare runtime and the server taking turns, {rounds} rounds ...")
            xs = [prepare(b, spec, max_pixels=DEFAULT_MAX_IMAGE_PIXELS) for b in bodies[:4]]
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
    """Server vs bare runtime: its extra latency at concurrency 1, paired per round (see `paired_overhead`), and
    its saturation throughput as a fraction of the bare runtime's best."""
    bare, single = doc.get("bare"), doc.get("single_stream") or {}
    c1 = next((r for r in doc["closed"] if r["concurrency"] == 1 and r["latency_ms"]), None)
    best = max(doc["closed"], key=lambda r: r["throughput_rps"], default=None)
    if best is None or not (bare or single):
        return None
    out: dict[str, Any] = {"saturation_rps": best["throughput_rps"], "saturation_concurrency": best["concurrency"]}
    if bare:
        b1 = bare["throughput_ips_by_batch"].get("1")
        out.update(bare_best_ips=bare["best_throughput_ips"], bare_best_batch=bare["best_batch"],
                   saturation_fraction_of_bare=best["throughput_rps"] / bare["best_throughput_ips"],
                   bare_b1_back_to_back_ms=1e3 / b1 if b1 else None)
    if single.get("server_ms"):
        out.update(c1_p50_ms=single["server_ms"]["p50"], c1_reference=single.get("reference", "bare"),
                   server_compute_p50_ms=(single["server_timing_ms"].get("compute") or {}).get("p50"),
                   c1_rounds=single["rounds"], c1_rps=c1["throughput_rps"] if c1 else None,
                   c1_ok=single.get("server_ok"), c1_requests=single.get("server_requests"),
                   c1_errors=dict(single.get("errors") or {}))
        out.update(paired_overhead(single["round_overhead_ms"]))
        if bare:
            infer, prep = single["bare_ms"]["p50"], bare["preprocess_ms"]["p50"]
            measured = out["c1_overhead_ms"]
            out.update(bare_infer_b1_p50_ms=infer, bare_preprocess_p50_ms=prep, bare_b1_ips=1e3 / infer,
                       c1_overhead_beyond_preprocess_ms=measured - prep if out["c1_overhead_measurable"] else None)
    return out


def _level(r: dict[str, Any]) -> str:
    return f"c={r['concurrency']}" if r["mode"] == "closed" else f"Poisson {r['target_rate']:.1f}/s"


def error_counts(errors: dict[str, int]) -> str:
    """"HTTP 429 ×4, ConnectionResetError ×1": every kind of error, the most frequent first."""
    return ", ".join(f"{k} ×{n}" for k, n in sorted(errors.items(), key=lambda kv: -kv[1]))


def _rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    single = doc.get("single_stream") or {}
    if single.get("server_requests") is not None:  # the concurrency-1 comparison's own requests
        lat, failed, n = single["server_ms"] or {}, sum(single["errors"].values()), single["server_requests"]
        rows.append(["turns" if single["reference"] == "bare" else "alone", "c=1", "-",
                     *(f"{lat[k]:.2f}" if lat else "-" for k in ("p50", "p90", "p99")),
                     str(single["server_ok"]), f"{failed} ({failed / n if n else 0:.1%})", "-"])
    for r in [*doc["closed"], doc["open"]]:
        lat = r["latency_ms"] or {}
        rows.append([r["mode"], _level(r), f"{r['throughput_rps']:.1f}",
                     *(f"{lat[k]:.2f}" if lat else "-" for k in ("p50", "p90", "p99")),
                     str(r["ok"]), f"{sum(r['errors'].values())} ({r['error_rate']:.1%})", f"{r['client_cpu_s']:.1f}"])
    return rows


E2E_HEADER = ["mode", "level", "req/s", "p50 ms", "p90 ms", "p99 ms", "ok", "errors", "client CPU s"]


def error_lines(doc: dict[str, Any]) -> list[str]:
    """One line per load level (and the concurrency-1 comparison) that had errors, naming every kind."""
    single = doc.get("single_stream") or {}
    lines = [f"errors during the concurrency-1 comparison: {error_counts(single['errors'])}"] \
        if single.get("errors") else []
    for r in [*doc["closed"], doc["open"]]:
        if r["errors"]:
            lines.append(f"errors at {r['mode']} {_level(r)}: {error_counts(r['errors'])}")
    return lines


def open_loop_lines(doc: dict[str, Any]) -> list[str]:
    """The open loop's offered and achieved rates, and whether the server fell behind or the client was the limit
    (none for results written before the open loop reported its offered rate)."""
    r = doc.get("open") or {}
    if r.get("offered_rps") is None:
        return []
    offered, achieved = r["offered_rps"], r["throughput_rps"]
    line = (f"open loop ({_level(r)}): offered {offered:.1f} req/s ({r['scheduled']} requests scheduled in the "
            f"{r['seconds']:g} s window), achieved {achieved:.1f} req/s ({r['ok']} successes in the "
            f"{r['served_s']:g} s from the window's start until the last was answered)")
    behind = r.get("fell_behind")
    # Short of the offered rate by requests that failed at once (refused, an error status), not by late answers.
    failing = not behind and r.get("failed") and achieved < (1 - r["behind_margin"]) * offered
    if behind:
        line += (f": the server fell behind (achieved {(1 - achieved / offered) * 100:.0f} % below offered, more "
                 f"than the {r['behind_margin'] * 100:.0f} % margin)")
    elif failing:
        line += (f": {r['failed']} of the {r['scheduled']} requests scheduled in the window failed "
                 f"({error_counts(r['errors'])}), not answered late")
    if r.get("dropped"):
        # Arrivals that found every connection waiting for an answer and the backlog full: a server slower than the
        # rate causes that (it fell behind: the usual case); only where the achieved rate kept up was it the client.
        said = behind or failing
        line += (f"{'; ' if said else ': '}{r['dropped']} of the {r['scheduled']} requests scheduled in the window "
                 f"were never sent (all {r['workers']} connections waiting for an answer and {r['backlog']} more "
                 f"arrivals queued behind them)" + ("" if said else ", so the client, not the server, was the limit"))
    return [line]


def _printed_levels(doc: dict[str, Any]) -> list[tuple[str, int]]:
    """("mode level", samples) of every table row whose percentiles are printed."""
    single = doc.get("single_stream") or {}
    rows = [(f"{'turns' if single.get('reference') == 'bare' else 'alone'} c=1", single["server_ms"].get("n"))] \
        if single.get("server_ms") else []
    rows += [(f"{r['mode']} {_level(r)}", r["latency_ms"].get("n", r["ok"]))
             for r in [*doc["closed"], doc["open"]] if r and r.get("latency_ms")]
    return [(name, n) for name, n in rows if n is not None]


def thin_lines(doc: dict[str, Any]) -> list[str]:
    """One line per percentile some row printed from too few samples, naming those rows and their counts."""
    lines = []
    for key, least in MIN_SAMPLES_FOR.items():
        if rows := [f"{name} (n={n})" for name, n in _printed_levels(doc) if thin(key, n)]:
            lines.append(f"{key} from fewer than {least} samples (it lies between the two largest): {', '.join(rows)}")
    return lines


def format_e2e(doc: dict[str, Any]) -> str:
    """Terminal table plus the open loop's rates, the errors and the overhead lines."""
    rows = [E2E_HEADER, *_rows(doc)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(E2E_HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines + thin_lines(doc) + open_loop_lines(doc) + error_lines(doc) + overhead_lines(doc))


def _c1_line(o: dict[str, Any]) -> str:
    """The concurrency-1 overhead: the figure with its interval, or "not measurable here" and why."""
    how = ("the server alone; reference: its own compute stage per request"
           if o.get("c1_reference") == COMPUTE_REFERENCE else "bare runtime and server timed in turns")
    what = f"server overhead at concurrency 1 ({how}, paired per round, {o['c1_rounds']} rounds)"
    ms, interval = o["c1_overhead_ms"], o["c1_overhead_interval_ms"]
    if ms is None:
        text = f"{what}: not measurable here ({o['c1_overhead_problem']})"
    else:
        figure = f"{ms:+.2f} ms ({o['c1_overhead_interval']} {interval[0]:+.2f} to {interval[1]:+.2f} ms)"
        text = (f"{what}: {figure}" if o["c1_overhead_measurable"]
                else f"{what}: not measurable here (median of the rounds {figure}: {o['c1_overhead_problem']})")
        beyond = o.get("c1_overhead_beyond_preprocess_ms")
        if o["c1_overhead_measurable"] and beyond is not None:
            text += f", {beyond:+.2f} ms beyond preprocessing"
    text += f"; server p50 {o['c1_p50_ms']:.2f} ms"
    if "bare_infer_b1_p50_ms" in o:
        text += f", bare inference p50 {o['bare_infer_b1_p50_ms']:.2f} ms"
    if o.get("server_compute_p50_ms") is not None:
        text += f", the server's own compute p50 {o['server_compute_p50_ms']:.2f} ms"
    if o.get("c1_errors"):
        failed = sum(o["c1_errors"].values())
        text += (f"; computed from a subset: the {o['c1_ok']} of {o['c1_requests']} requests that succeeded "
                 f"({failed} failed: {error_counts(o['c1_errors'])})")
    return text


def overhead_lines(doc: dict[str, Any]) -> list[str]:
    """Human sentences for the server-vs-bare comparison."""
    o, bare = doc.get("overhead"), doc.get("bare")
    if not o:
        return ["(no --bundle: bare-runtime comparison not run)"]
    lines = []
    if bare:
        back = o.get("bare_b1_back_to_back_ms")
        lines.append(f"bare {bare['runtime']} {bare['precision']}: infer b1 p50 {bare['infer_b1_ms']['p50']:.2f} ms "
                     "in turns with the server (the overhead's reference); timed alone afterwards, back to back: "
                     + (f"b1 {back:.2f} ms per call, " if back else "")
                     + f"best {bare['best_throughput_ips']:.1f} img/s at batch {bare['best_batch']} (the saturation "
                     f"reference); preprocess p50 {bare['preprocess_ms']['p50']:.2f} ms")
        infer = bare["infer_b1_ms"]["p50"]
        if back and max(back, infer) > 1.5 * min(back, infer):
            lines.append(f"the two bare batch-1 figures differ {max(back, infer) / min(back, infer):.1f}x "
                         f"({infer:.2f} ms in turns, {back:.2f} ms alone): the machine is not in the same state "
                         "while the server takes its turns (its threads, caches, clock), so each comparison uses "
                         "only the figure taken the same way as its own")
    elif doc.get("bare_skipped"):
        lines.append(f"bare runtime not opened in-process: {doc['bare_skipped']}")
    if bare and "options_from" in bare:  # results written before the bare runtime mirrored the server do not say
        lines.append(f"bare runtime opened with options from {bare['options_from']}; "
                     + (f"its execution differs from the server's: {'; '.join(bare['differs'])}" if bare["differs"]
                        else "it runs as the server reports running (same execution report)"))
    if "c1_p50_ms" in o:
        lines.append(_c1_line(o))
    if "saturation_fraction_of_bare" in o:
        lines.append(f"saturation: {o['saturation_rps']:.1f} req/s at concurrency {o['saturation_concurrency']} = "
                     f"{o['saturation_fraction_of_bare']:.0%} of the bare runtime's {o['bare_best_ips']:.1f} img/s")
    else:
        lines.append(f"saturation: {o['saturation_rps']:.1f} req/s at concurrency {o['saturation_concurrency']} "
                     "(no bare runtime to compare it with)")
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
        f"- {provenance(env)}",
        f"- Requests: {doc['config']['images']} {doc['config'].get('image_format', 'png').upper()} animals val "
        f"images{_size_note(doc['config'].get('image_size'))} (mean {doc['config']['image_bytes_mean']:.0f} bytes), "
        f"raw body to /v1/models/{m['name']}/classify; {doc['config']['duration_s']:g} s per level after "
        f"{doc['config']['warmup_s']:g} s warm-up",
        "",
        *table,
        "",
        *stage_table(doc),
        *(f"- {line}" for line in thin_lines(doc) + open_loop_lines(doc) + error_lines(doc) + overhead_lines(doc)),
        "",
        *(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(parts) + "\n"


def provenance(env: dict[str, Any]) -> str:
    """The library versions and the git commit the run used (as the latency report gives them)."""
    git = env.get("git") or {}
    commit = (f"git {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git.get("commit")
              else "git commit not recorded (not run from a git checkout)")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    return f"Versions: {versions or 'not recorded'}; {commit}"


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
        level = _level(r)
        cells = [f"{r['server_timing_ms'][k]['p50']:.2f}" if k in r["server_timing_ms"] else "-" for k in stages]
        lines.append(f"| {level} | {r['latency_ms']['p50']:.2f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_e2e(doc: dict[str, Any]) -> bytes:
    """Latency percentiles and throughput vs concurrency, with the bare runtime for reference."""
    from benchmarks.plots import batch_axis, figure, png

    fig, axes = figure(1, 2, (4.6, 3.4))
    closed = [r for r in doc["closed"] if r["latency_ms"]]
    xs = [r["concurrency"] for r in closed]
    ax = axes[0][0]
    for k, style in (("p50", "-o"), ("p90", "--s"), ("p99", ":^")):
        ax.plot(xs, [r["latency_ms"][k] for r in closed], style, label=f"server {k}")
    if doc.get("bare"):
        ax.axhline(doc["bare"]["infer_b1_ms"]["p50"], color="k", lw=0.8, label="bare infer b1 p50")
    batch_axis(ax, xs or [1])
    if closed:
        ax.set_yscale("log")  # a log scale of nothing raises: every request of every level failed
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("latency ms")
    ax = axes[0][1]
    ax.plot(xs, [r["throughput_rps"] for r in closed], "-o", label="server req/s")
    if doc.get("bare"):
        ax.axhline(doc["bare"]["best_throughput_ips"], color="k", lw=0.8,
                   label=f"bare best (batch {doc['bare']['best_batch']})")
    batch_axis(ax, xs or [1])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("images / s")
    for ax in axes[0]:
        if not closed:
            ax.text(0.5, 0.5, "no successful requests", transform=ax.transAxes, ha="center", va="center")
        else:
            ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{doc['server_model']['name']}: server vs bare runtime ({doc['host']})")
    return png(fig)


def write_e2e_reports(doc: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """<stem>-http.json / .md / .png into `out_dir`, all rendered first, then published together; the paths."""
    from benchmarks.report import publish, stem_name, unused_stem
    from models.io import strict_json_bytes

    stem = unused_stem(out_dir, stem_name(doc, "-http"), (".json", ".md", ".png"))
    json_path, md_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    pngs = {png_path: plot_e2e(doc)} if plots else {}
    return publish({json_path: strict_json_bytes(doc), md_path: markdown_e2e(doc, [p.name for p in pngs]).encode(),
                    **pngs}, f"the results {stem} in {out_dir}")


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
