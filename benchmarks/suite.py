"""The latency benchmark itself: machine limit, then every (pair, target, batch) cell, as one JSON-ready document.

Per cell both models of a pair are loaded side by side and timed in interleaved rounds (benchmarks/measure.py),
so the ViT_C / ViT_P ratio is measured under the same machine conditions. Achieved GFLOP/s use the analytic
multiply-adds of models/complexity.py at 2 flops each, the convention of the matmul limit.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import bundles, machine
from benchmarks.measure import FULL, Budget, input_pool, time_pair
from benchmarks.runners import Target, all_targets, export_targets, open_target, unavailable, unavailable_here
from benchmarks.stats import achieved_gflops, ratio_summary, raw_samples, summarize
from models.bundle import Manifest

SCHEMA = "vitc-latency-benchmark"
# 2: a ratio entry's "ratio" is the median per-round C/P ratio (1: the ratio of the two medians, which could lie
# outside its own interval), with "interval_kind", "estimator" and "firm" beside it.
# 3: a ratio's verdict is "inconclusive" below the budget's minimum rounds or calls (or from one round), "too_few"
# saying what was missing; each cell keeps its per-call latencies ("samples_ms", stats.raw_samples).
SCHEMA_VERSION = 3


class NothingToMeasure(ValueError):
    """No target of the run can run here (not installed, no GPU, refused by its parity gate): one line, exit 2."""


def _nothing_to_measure(reasons: dict[str, str]) -> NothingToMeasure:
    by_reason: dict[str, list[str]] = {}
    for target, reason in reasons.items():
        by_reason.setdefault(reason, []).append(target)
    return NothingToMeasure("nothing to measure: no target can run here ("
                            + "; ".join(f"{', '.join(ts)}: {r}" for r, ts in by_reason.items()) + ")")


@dataclass(frozen=True)
class SuiteConfig:
    """What to run and how long to spend on it."""

    pairs: tuple[str, ...] = ("1gf", "mini")
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    targets: tuple[Target, ...] = field(default_factory=all_targets)
    threads: int = 2
    budget: Budget = FULL
    limit_seconds: float = 3.0  # per precision, at the start and again at the end
    cache: Path = bundles.DEFAULT_CACHE
    parity_samples: int = 512  # export parity images per trained bundle (first run only: bundles are cached)
    calibration_samples: int = 300  # INT8 calibration images
    checkpoints: tuple[tuple[str, Path], ...] = ()  # (model, checkpoint dir) overriding the default weights
    quick: bool = False
    progress: bool = True
    argv: tuple[str, ...] = field(default_factory=tuple)


def _macs(manifest: Manifest) -> int:
    from models.complexity import complexity

    return complexity(manifest.config).flops


def _progress(total: int, enabled: bool):  # noqa: ANN202 - a tqdm bar or a no-op stand-in
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)

    class _Null:
        def update(self, _n: int = 1) -> None: ...
        def set_description_str(self, _s: str) -> None: ...
        def write(self, _s: str) -> None: ...
        def close(self) -> None: ...

    return _Null()


def measure_limits(cfg: SuiteConfig, gpus: int) -> dict[str, Any]:
    """The machine's matmul limits: CPU always, the first CUDA GPU when there is one."""
    limits: dict[str, Any] = {"cpu": machine.cpu_matmul_limits(cfg.threads, cfg.limit_seconds,
                                                              sizes=(512,) if cfg.quick else (1024, 2048))}
    if gpus:
        limits["cuda"] = machine.cuda_matmul_limits(cfg.limit_seconds)
    return limits


def _merge_limits(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Keep, per device and precision, the better of the start and end measurements (and both values)."""
    merged: dict[str, Any] = {}
    for device, table in first.items():
        merged[device] = {}
        for precision, a in table.items():
            b = second.get(device, {}).get(precision, {})
            best = max((a, b), key=lambda e: e.get("gflops") or 0.0)
            merged[device][precision] = {**best, "start_gflops": a.get("gflops"), "end_gflops": b.get("gflops")}
    return merged


def _cell(model: bundles.PreparedModel, target: Target, batch: int, samples: list[float], info: dict[str, Any],
          limits: dict[str, Any], timing: Any) -> dict[str, Any]:
    ms = [s * 1e3 for s in samples]
    stats = summarize(ms)
    macs = _macs(model.manifest)
    gflops = achieved_gflops(macs, batch, stats["p50"] / 1e3)
    limit, limit_name = machine.limit_for(limits, target.device.split(":")[0], target.precision)
    return {
        "pair": model.pair, "model": model.model, "stem": model.stem, "source": model.source,
        "target": target.id, "runtime": target.runtime, "precision": target.precision, "device": target.device,
        "compiled": target.compile, "channels_last": info.get("channels_last"),
        "batch": batch, "threads": info.get("threads_effective", info.get("threads")),
        "latency_ms": stats, "samples_ms": raw_samples(ms), "reps": stats["n"], "rounds": timing.rounds,
        "hit_time_limit": timing.hit_time_limit,
        "throughput_ips": batch / (stats["p50"] / 1e3),
        "macs_per_image": macs, "gflops": gflops, "limit": limit_name, "limit_gflops": limit,
        "fraction_of_limit": gflops / limit if limit else None,
        "load_1m": (machine.load_average() or [None])[0],  # other work on the machine while this cell ran
    }


def _run_target(cfg: SuiteConfig, c: bundles.PreparedModel, p: bundles.PreparedModel, target: Target,
                limits: dict[str, Any], doc: dict[str, Any], bar: Any) -> None:
    """Open both models on one target, record their cold starts, and time every batch size."""
    opened = []
    try:
        for model in (c, p):
            o = open_target(target, model.bundle, model.manifest, cfg.threads, tuple(cfg.batch_sizes))
            opened.append(o)
            doc["cold_start"].append({"pair": model.pair, "model": model.model, "target": target.id,
                                      "seconds": o.cold_start_s, "info": o.info})
        shape = c.manifest.input.sample_shape
        max_batch = min(m.manifest.input.max_batch for m in (c, p))
        for batch in cfg.batch_sizes:
            bar.set_description_str(f"{c.pair} {target.id} b{batch}")
            if batch > max_batch:
                doc["skipped"].append({"pair": c.pair, "target": target.id, "batch": batch,
                                       "reason": f"batch {batch} > the bundles' max batch {max_batch}"})
                bar.update()
                continue
            timing = time_pair(opened[0].infer, opened[1].infer, input_pool(batch, shape), cfg.budget)
            cells = [_cell(m, target, batch, t, o.info, limits, timing)
                     for m, t, o in ((c, timing.c, opened[0]), (p, timing.p, opened[1]))]
            doc["results"] += cells
            ratio = ratio_summary(timing.c, timing.p, timing.round_ratios, min_rounds=cfg.budget.min_rounds,
                                  min_reps=cfg.budget.min_reps)
            doc["ratios"].append({"pair": c.pair, "target": target.id, "batch": batch, **ratio,
                                  "c_model": c.model, "p_model": p.model,
                                  "c_p50_ms": cells[0]["latency_ms"]["p50"], "p_p50_ms": cells[1]["latency_ms"]["p50"],
                                  "macs_ratio": cells[0]["macs_per_image"] / cells[1]["macs_per_image"]})
            bar.update()
    finally:
        for o in opened:
            o.close()


def _breakdowns(cfg: SuiteConfig, prepared: dict[str, tuple[bundles.PreparedModel, bundles.PreparedModel]],
                runnable: list[tuple[str, Target]], limits: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-op profiles (smallest and largest batch) of every model, to show where the time goes."""
    from benchmarks.breakdown import can_profile, op_profile

    out = []
    for pair, target in runnable:
        if not can_profile(target.runtime) or target.variant.inference_precision is not None:
            continue
        for model in prepared[pair]:
            for batch in sorted({min(cfg.batch_sizes), max(cfg.batch_sizes)}):
                try:
                    prof = op_profile(model.bundle, model.manifest, target.runtime, target.precision, batch,
                                      cfg.threads, reps=2 if cfg.quick else 5)
                except Exception as exc:  # a profile is commentary: never lose the run over it
                    out.append({"pair": pair, "model": model.model, "target": target.id, "batch": batch,
                                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
                    continue
                macs = _macs(model.manifest)
                gemm = achieved_gflops(macs, batch, prof["matmul_ms"] / 1e3) if prof["matmul_ms"] > 0 else None
                limit, name = machine.limit_for(limits, "cpu", target.precision)
                out.append({"pair": pair, "model": model.model, "target": target.id, **prof,
                            "gemm_gflops": gemm, "limit": name,
                            "gemm_fraction_of_limit": gemm / limit if gemm and limit else None})
    return out


def run_suite(cfg: SuiteConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole benchmark and return its results document (see benchmarks/report.py for the files)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    env = machine.environment(cfg.threads)
    gpus = len(env["gpus"])
    log(f"machine: {env['cpu']['model']}, {env['cpu']['usable_cpus']} CPUs, flags {' '.join(env['cpu']['flags'])}, "
        f"{gpus} GPU(s), load average {env['load_average']}; measuring the matmul limit ...")
    limits = measure_limits(cfg, gpus)
    native_bf16 = bool(limits["cpu"]["bf16"]["native"])
    here = {t.id: unavailable_here(t, gpus=gpus, native_bf16=native_bf16) for t in cfg.targets}
    if all(here.values()):  # before minutes of exports for nothing
        raise _nothing_to_measure(here)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": env["host"], "argv": list(cfg.argv),
        "config": {"pairs": list(cfg.pairs), "batch_sizes": list(cfg.batch_sizes),
                   "targets": [t.id for t in cfg.targets], "threads": cfg.threads, "budget": asdict(cfg.budget),
                   "quick": cfg.quick, "flops_convention": "GFLOP/s = 2 * MACs * batch / p50 latency; "
                   "matmul limit = 2 * M * N * K / time (int8: GOP/s)"},
        "environment": env, "machine_limit": limits,
        "models": {}, "results": [], "ratios": [], "cold_start": [], "skipped": [],
    }
    prepared: dict[str, tuple[bundles.PreparedModel, bundles.PreparedModel]] = {}
    for pair in cfg.pairs:
        c_name, p_name = bundles.PAIRS[pair]
        needed = export_targets(list(cfg.targets), gpus, native_bf16)
        max_batch = max(32, *cfg.batch_sizes)
        given = dict(cfg.checkpoints)
        c, p = (bundles.prepare_model(pair, m, cache=cfg.cache, targets=needed, max_batch=max_batch, log=log,
                                      parity_samples=cfg.parity_samples, checkpoint=given.get(m),
                                      calibration_samples=cfg.calibration_samples)
                for m in (c_name, p_name))
        prepared[pair] = (c, p)
        for m in (c, p):
            doc["models"][m.model] = {"pair": pair, "stem": m.stem, "source": m.source, "bundle": str(m.bundle),
                                      "checkpoint": str(m.checkpoint), "macs_per_image": _macs(m.manifest),
                                      "image_size": m.manifest.input.height,
                                      "int8_parity": bundles.int8_parity(m.manifest)}
    runnable: list[tuple[str, Target]] = []
    for pair, (c, p) in prepared.items():
        for target in cfg.targets:
            reason = (unavailable(target, c.manifest, gpus=gpus, native_bf16=native_bf16)
                      or unavailable(target, p.manifest, gpus=gpus, native_bf16=native_bf16))
            if reason:
                doc["skipped"].append({"pair": pair, "target": target.id, "reason": reason})
            else:
                runnable.append((pair, target))
    if not runnable:  # every target refused by the bundles' parity gates, say
        raise _nothing_to_measure({f"{s['pair']} {s['target']}": s["reason"] for s in doc["skipped"]})
    bar = _progress(len(runnable) * len(cfg.batch_sizes), cfg.progress)
    try:
        for pair, target in runnable:
            c, p = prepared[pair]
            try:
                _run_target(cfg, c, p, target, doc["machine_limit"], doc, bar)
            except Exception as exc:  # one broken runtime must not lose the others' numbers
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                doc["skipped"].append({"pair": pair, "target": target.id, "reason": f"failed: {first}"})
                bar.write(f"{pair} {target.id}: failed: {first}")
    finally:
        bar.close()
    # The limit again, after the models: drift over the run shows as start vs end, and the better one counts.
    doc["machine_limit"] = _merge_limits(limits, measure_limits(cfg, gpus))
    for cell in doc["results"]:  # re-judge every cell against the final (best) limit
        limit, name = machine.limit_for(doc["machine_limit"], cell["device"].split(":")[0], cell["precision"])
        cell.update(limit=name, limit_gflops=limit, fraction_of_limit=cell["gflops"] / limit if limit else None)
    doc["breakdown"] = _breakdowns(cfg, prepared, runnable, doc["machine_limit"])
    doc["environment"]["load_average_end"] = machine.load_average()
    doc["wall_seconds"] = round(time.perf_counter() - started, 1)
    return doc


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
