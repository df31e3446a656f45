"""`make gpu-check`: the whole GPU path in one command, each step a process with a time limit.

    python -m benchmarks.gpu_check                # on a CUDA machine, about 5 minutes on one H200
    python -m benchmarks.gpu_check --device cpu --smoke --out /tmp/x   # the same steps, tiny, on the CPU

Steps: CUDA training with torch.compile (vit_c_mini, animals, one epoch); a real NCCL process group (torchrun, one
rank); export of that checkpoint to torch fp32/bf16/fp16 (and TensorRT fp16/INT8 where installed) through the
export's parity gates; parity of every torch precision on the GPU itself (bf16 also compiled); the GPU latency
benchmark (every torch-CUDA target on the 1GF pair, bf16 on 4GF..72GF, against the matmul limit of the same run);
vit_c_1gf served over HTTP (bf16, compiled, 224x224 JPEG requests) at concurrency 1, 16 and 64. A failed step is
recorded with its output and the next steps still run. Writes <date>-<host>-gpu-check.json / .md to --out
(benchmarks/results by default), next to the latency and HTTP reports the steps write there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.cli import OneLineParser, int_in

REPO = Path(__file__).resolve().parents[1]
MAX_PARITY_SAMPLES = 100_000
SCHEMA = "vitc-gpu-check"


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check on a GPU, or a smoke run of the same steps on the CPU."""

    train: tuple[str, ...]
    ddp: tuple[str, ...]
    parity_samples: int
    latency: tuple[tuple[str, ...], ...]
    serve_args: str
    load: tuple[str, ...]


GPU = Sizes(
    train=("--model", "vit_c_mini", "--dataset", "animals", "--epochs", "1", "--compile"),
    ddp=("--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "20"),
    parity_samples=256,
    latency=(
        ("--pairs", "1gf", "--targets", "torch-cuda-fp32,torch-cuda-bf16,torch-cuda-bf16-nchw,torch-cuda-bf16-compiled,"
         "torch-cuda-bf16-compiled-nchw,torch-cuda-fp16,torch-cuda-fp16-compiled,tensorrt-fp16,tensorrt-int8,"
         "onnxruntime-cuda-fp32", "--batch-sizes", "1,32,256", "--cell-seconds", "1.5", "--parity-samples", "64"),
        ("--pairs", "4gf,18gf,36gf,72gf", "--targets", "torch-cuda-bf16,torch-cuda-bf16-nchw",
         "--batch-sizes", "1,32,256", "--cell-seconds", "1", "--parity-samples", "16"),
    ),
    serve_args="--precision bf16 --compile --max-batch-size 64",
    load=("--image-format", "jpeg", "--image-size", "224", "--concurrency", "1,16,64", "--duration", "8"),
)
SMOKE = Sizes(
    train=("--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "3",
           "--train-subset", "64", "--val-subset", "32", "--batch-size", "16"),
    ddp=("--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--max-steps", "2",
         "--train-subset", "64", "--batch-size", "16"),
    parity_samples=32,
    latency=(("--quick", "--pairs", "micro", "--targets", "torch-fp32", "--batch-sizes", "1", "--cell-seconds",
              "0.3", "--min-reps", "3", "--parity-samples", "8", "--no-plots", "--no-progress"),),
    serve_args="",
    load=("--quick", "--concurrency", "1", "--duration", "1", "--no-plots"),
)


def _step(name: str, cmd: list[str], timeout: float, log: Any) -> dict[str, Any]:
    """Run one step; its exit code, seconds and the tail of its output (the command never raises here)."""
    log(f"[gpu-check] {name}: {shlex.join(cmd)}")
    t0 = time.perf_counter()
    stdout = ""
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, stdout, out = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {timeout:g} s\n" + str(exc.stdout or "")[-2000:]
    seconds = time.perf_counter() - t0
    log(f"[gpu-check] {name}: exit {rc} in {seconds:.1f} s")
    last = next((ln for ln in reversed(stdout.splitlines()) if ln.strip()), "")
    return {"name": name, "command": shlex.join(cmd), "rc": rc, "seconds": round(seconds, 1), "facts": {},
            "output_tail": out[-3000:] if rc else out[-400:], "last_line": last}


def _training_facts(run_dir: Path) -> dict[str, Any]:
    doc = json.loads((run_dir / "checkpoint.json").read_text())["training"]
    keys = ("model", "device_name", "amp", "channels_last", "compile", "world_size", "ddp_backend", "steps",
            "samples_per_s", "final_val_top1", "wall_time_s")
    return {k: doc.get(k) for k in keys}


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
    """Every torch artifact of the bundle on `device` (bf16 also compiled) through the export's parity gate."""
    from export.bundle import parity_data
    from export.parity import measure
    from models.bundle import read_manifest
    from models.checkpoint import load_checkpoint
    from runtimes import BackendOptions, open_backend

    manifest = read_manifest(bundle)
    model, meta = load_checkpoint(checkpoint)
    max_batch = manifest.input.max_batch
    data = parity_data(model, meta, manifest.source.dataset or meta.raw.get("dataset"), samples, max_batch)
    out = {}
    for art in manifest.servable("torch"):
        # Compiled (CUDA graphs) for the precision served compiled; compiling on the CPU (inductor, minutes) would
        # prove nothing the GPU run does not.
        for compiled in (False, True) if device.startswith("cuda") and art.precision == "bf16" else (False,):
            options = BackendOptions(device=device, compile=compiled, buckets=tuple(sorted({1, 8, max_batch})))
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


def run(device: str, sizes: Sizes, out: Path, work: Path, log: Any = print) -> dict[str, Any]:
    """Every step in order; the JSON document of the check."""
    from benchmarks import machine

    py = sys.executable
    start = time.time()
    steps: list[dict[str, Any]] = []
    train_dir, ddp_dir, bundle = work / "train", work / "ddp", work / "bundle"

    s = _step("train", [py, "-m", "train", *sizes.train, "--device", device, "--out", str(train_dir)], 900, log)
    if s["rc"] == 0:
        s["facts"] = _training_facts(train_dir)
    steps.append(s)

    s = _step("ddp", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "train",
                      *sizes.ddp, "--device", device, "--out", str(ddp_dir)], 600, log)
    if s["rc"] == 0:
        s["facts"] = _training_facts(ddp_dir)
        expected = "nccl" if device.startswith("cuda") else "gloo"
        if s["facts"]["ddp_backend"] != expected:
            s["rc"], s["output_tail"] = 1, f"process group backend {s['facts']['ddp_backend']}, expected {expected}"
    steps.append(s)

    import runtimes

    targets = ["torch-fp32", "torch-bf16", "torch-fp16"]
    trt = runtimes.get("tensorrt")
    if device.startswith("cuda") and trt.installed() and trt.unavailable(device) is None:
        targets += ["tensorrt-fp16", "tensorrt-int8"]
    s = _step("export", [py, "-m", "export", "--checkpoint", str(train_dir), "--out", str(bundle), "--targets",
                         ",".join(targets), "--parity-samples", str(sizes.parity_samples)], 900, log)
    if s["rc"] == 0:
        from models.bundle import read_manifest

        s["facts"] = {f"{a.runtime}-{a.precision}": "certified" for a in read_manifest(bundle).artifacts}
    steps.append(s)

    s = _step("parity-on-device", [py, "-m", "benchmarks.gpu_check", "--parity-of", str(bundle), "--checkpoint",
                                   str(train_dir), "--device", device,
                                   "--parity-samples", str(sizes.parity_samples)], 900, log)
    if s["rc"] == 0:
        s["facts"] = json.loads(s["last_line"])
        if not all(v["passed"] for v in s["facts"].values()):
            s["rc"] = 1
    steps.append(s)

    latency_docs = []
    for i, args in enumerate(sizes.latency):
        t0 = time.time()
        # A smoke run keeps its bundle cache to itself; a GPU run reuses exports/bench/ from one check to the next.
        cache = ("--cache", str(work / "bench")) if sizes is SMOKE else ()
        s = _step(f"latency-{i + 1}", [py, "benchmarks/latency.py", *args, *cache, "--out", str(out)], 1200, log)
        if (path := _newest(out, "*.json", t0)) is not None and s["rc"] == 0:
            doc = json.loads(path.read_text())
            s["facts"], s["report"] = _latency_facts(doc), path.name
            latency_docs.append(doc)
        steps.append(s)

    served = _served_bundle(latency_docs) or bundle
    t0 = time.time()
    server_args = f"--device {device} {sizes.serve_args}".strip()
    s = _step("serve-under-load", [py, "benchmarks/latency.py", "--http", "start", "--bundle", str(served),
                                   "--runtime", "torch", f"--server-args={server_args}", *sizes.load,
                                   "--out", str(out)], 900, log)
    if (path := _newest(out, "*-http.json", t0)) is not None and s["rc"] == 0:
        doc = json.loads(path.read_text())
        s["facts"] = {"bundle": str(served), "server_args": server_args, "overhead": doc.get("overhead"),
                      "closed": [{k: lvl.get(k) for k in ("concurrency", "throughput_rps", "latency_ms", "errors")}
                                 for lvl in doc.get("closed", [])]}
        s["report"] = path.name
    steps.append(s)

    return {"schema": SCHEMA, "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": device,
            "smoke": sizes is SMOKE, "environment": machine.environment(None), "steps": steps,
            "passed": all(x["rc"] == 0 for x in steps), "wall_seconds": round(time.time() - start, 1)}


def _served_bundle(latency_docs: list[dict[str, Any]]) -> Path | None:
    """The vit_c_1gf bundle the GPU latency run exported (the model the serving check is stated for)."""
    for doc in latency_docs:
        path = (doc.get("models") or {}).get("vit_c_1gf", {}).get("bundle")
        if path and Path(path).is_dir():
            return Path(path)
    return None


def markdown(doc: dict[str, Any]) -> str:
    """One table of steps, then each step's facts."""
    env = doc["environment"]
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus") or []) or "none"
    lines = [f"# GPU check ({doc['created']}, {'smoke run on ' if doc['smoke'] else ''}{doc['device']})", "",
             f"- Machine: {env['cpu']['model']}, {env['cpu']['usable_cpus']} CPUs; GPUs: {gpus}; git "
             f"{((env.get('git') or {}).get('commit') or '?')[:12]}",
             f"- Result: **{'passed' if doc['passed'] else 'FAILED'}** in {doc['wall_seconds']:.0f} s", "",
             "| step | exit | seconds | report |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['rc']} | {s['seconds']:.1f} | {s.get('report', '')} |" for s in doc["steps"]]
    for s in doc["steps"]:
        lines += ["", f"## {s['name']}", "", f"`{s['command']}`", ""]
        if s["facts"]:
            lines += ["```json", json.dumps(s["facts"], indent=1, default=str)[:6000], "```"]
        if s["rc"]:
            lines += ["```", s["output_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def _device(text: str) -> str:
    """An argparse type: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _parity_main(prog: str, args: argparse.Namespace) -> int:
    """--parity-of: the JSON line, or one line on stderr and exit 2 for a bundle or checkpoint that cannot load."""
    from runtimes import BackendError

    if args.checkpoint is None:
        print(f"{prog}: error: --parity-of needs --checkpoint", file=sys.stderr)
        return 2
    try:
        facts = parity_on_device(args.parity_of, args.checkpoint, args.device, args.parity_samples)
    except (ValueError, BackendError, OSError) as exc:  # BundleError, CheckpointError, DatasetError are ValueErrors
        text = str(exc).strip()
        print(f"{prog}: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(facts))
    return 0


def _setup_problem(args: argparse.Namespace) -> str | None:
    """Why the check cannot run as asked, found before its first step (minutes) starts."""
    from benchmarks.report import out_dir_problem

    if args.device == "cpu" and not args.smoke:
        # The full sizes (vit_c_mini with torch.compile, the paper's 1GF..72GF pairs) are meant for a GPU: on the
        # CPU they would run for hours and prove nothing the smoke run does not.
        return "--device cpu runs the smoke check only: add --smoke (the full check needs a CUDA GPU)"
    for flag, path in (("--out", args.out), ("--work", args.work)):
        if path is not None and (problem := out_dir_problem(path)):
            return f"{flag} {path}: {problem}; give a directory"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the check (or, with --parity-of, one bundle's on-device parity as a JSON line)."""
    p = OneLineParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=_device, default="cuda",
                   help="cuda (default) or cuda:N; cpu only with --smoke (the full check needs a GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes of the same steps (what the tests run with --device cpu)")
    p.add_argument("--out", type=Path, default=Path("benchmarks") / "results",
                   help="report directory, created if missing (default benchmarks/results under the current "
                   "directory)")
    p.add_argument("--work", type=Path, help="working directory for runs and bundles (default: a temporary one)")
    p.add_argument("--parity-of", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--parity-samples", type=int_in(1, MAX_PARITY_SAMPLES), default=256, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # The steps run from the checkout (cwd=REPO): paths the user gave are the ones under their own directory.
    args.out, args.work = args.out.absolute(), args.work and args.work.absolute()
    if args.parity_of:
        return _parity_main(p.prog, args)
    if problem := _setup_problem(args):
        print(f"{p.prog}: error: {problem}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"{p.prog}: error: no CUDA GPU here (use --device cpu --smoke for the CPU smoke run)",
                  file=sys.stderr)
            return 2
    import tempfile

    from benchmarks.report import stem_name, unused_stem
    from models.io import atomic_write_bytes, atomic_write_json

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitc-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        doc = run(args.device, SMOKE if args.smoke else GPU, args.out, work,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    doc["host"] = doc["environment"]["host"]
    stem = args.out / unused_stem(args.out, stem_name(doc, "-gpu-check"), (".json", ".md"))
    atomic_write_json(stem.with_suffix(".json"), doc)
    atomic_write_bytes(stem.with_suffix(".md"), markdown(doc).encode())
    print(f"{'passed' if doc['passed'] else 'FAILED'}: wrote {stem}.json, {stem}.md")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    from models import cli

    cli.run(main, "python -m benchmarks.gpu_check")
