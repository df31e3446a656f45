"""Turn a latency results document into its headline summary, a terminal table, Markdown, and files on disk.

Files are named by date, time and host (`2026-11-24-2331-vm.json`, `.md`, `-latency.png`, `-ratio.png`) and
published all together or not at all (`publish`, which every benchmark's results go through).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.stats import MIN_CI_ROUNDS, THIN_NOTE, marked, thin
from models.cli import WorkFailed, machine_error
from models.io import committing, ensure_dir, stage, strict_json_bytes


def _by(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def summarize_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers per pair: best batch-1 latency per model, INT8 speed-ups, C/P ratios, flagged cells."""
    out: dict[str, Any] = {}
    for pair in doc["config"]["pairs"]:
        cells = _by(doc["results"], pair=pair)
        models = sorted({c["model"] for c in cells})
        best_b1 = {}
        for m in models:
            b1 = _by(cells, model=m, batch=1)
            if b1:
                best = min(b1, key=lambda c: c["latency_ms"]["p50"])
                best_b1[m] = {k: best[k] for k in ("target", "gflops", "fraction_of_limit", "limit")}
                best_b1[m]["p50_ms"] = best["latency_ms"]["p50"]
                best_b1[m]["ci95_ms"] = best["latency_ms"]["ci95"]
        int8 = []
        for m in models:
            for fp32 in _by(cells, model=m, target="openvino-fp32"):
                q = _by(cells, model=m, target="openvino-int8", batch=fp32["batch"])
                if q:
                    int8.append({"model": m, "batch": fp32["batch"],
                                 "speedup": fp32["latency_ms"]["p50"] / q[0]["latency_ms"]["p50"],
                                 "parity": (doc["models"].get(m) or {}).get("int8_parity")})
        ratios = _by(doc["ratios"], pair=pair)
        out[pair] = {
            "best_batch1": best_b1,
            "int8_speedup_vs_openvino_fp32": int8,
            "ratios": [{**{k: r[k] for k in ("target", "batch", "ratio", "interval", "flagged", "verdict")},
                        "interval_kind": _interval_kind(r), "firm": _firm(r)} for r in ratios],
            "flagged": [_flag(r) for r in ratios if r["flagged"]],
        }
    return out


def _flag(r: dict[str, Any]) -> str:
    """A flagged C/P cell as the headlines name it."""
    return f"{r['target']} b{r['batch']}: {r['ratio']:.3f}"


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per (pair, target, batch): C and P latency percentiles, their ratio, and GFLOP/s vs the limit."""
    rows = []
    for r in doc["ratios"]:
        c = _by(doc["results"], pair=r["pair"], target=r["target"], batch=r["batch"], model=r["c_model"])[0]
        p = _by(doc["results"], pair=r["pair"], target=r["target"], batch=r["batch"], model=r["p_model"])[0]
        lat = [" / ".join(marked(_ms(x["latency_ms"][k]), k, _n(x)) for k in ("p50", "p90", "p99")) for x in (c, p)]
        lo, hi = r["interval"]
        kind = _interval_kind(r)
        rows.append([
            r["pair"], r["target"], str(r["batch"]), lat[0], lat[1],
            f"{r['ratio']:.3f}" + (" !" if r["flagged"] else ""),
            f"{lo:.2f}-{hi:.2f}" + ("" if kind == CI else f" ({kind})"), _verdict(r),
            f"{r['macs_ratio']:.3f}",
            f"{c['gflops']:.1f} / {p['gflops']:.1f}",
            f"{_pct(c['fraction_of_limit'])} / {_pct(p['fraction_of_limit'])}",
            f"{c['latency_ms']['rel_spread']:.0%} / {p['latency_ms']['rel_spread']:.0%}", f"{c['reps']}/{p['reps']}",
        ])
    return rows


CI = "95% CI"


def _n(cell: dict[str, Any]) -> int | None:
    """How many calls a cell's percentiles come from."""
    return cell["latency_ms"].get("n", cell.get("reps"))


def thin_notes(doc: dict[str, Any]) -> list[str]:
    """THIN_NOTE when some cell's printed p90 or p99 comes from too few calls, else nothing."""
    return [THIN_NOTE] if any(thin(k, _n(c)) for c in doc["results"] for k in ("p90", "p99")) else []


def _interval_kind(r: dict[str, Any]) -> str:
    """What a ratio's interval is ("95% CI", "range of 2 rounds"); results before schema 2 did not say."""
    return r.get("interval_kind", CI)


def _firm(r: dict[str, Any]) -> bool:
    """Whether a ratio's verdict is firm (a 95 % CI from enough rounds and calls); results before "firm" (schema 2)
    said it only as an "indicative: ..." verdict."""
    return r.get("firm", not r["verdict"].startswith("indicative"))


def _finding(r: dict[str, Any]) -> bool:
    """Whether a flagged ratio is a finding: a firm verdict that concludes (not "inconclusive")."""
    return _firm(r) and r["verdict"] != "inconclusive"


def _unconcluded(r: dict[str, Any]) -> str:
    """A flagged ratio that is no finding, with why: "onnxruntime-fp32 b1: 0.785 (indicative: range of 3 rounds)"."""
    why = "inconclusive" if r["verdict"] == "inconclusive" else f"indicative: {_interval_kind(r)}"
    return f"{_flag(r)} ({why})"


def _verdict(r: dict[str, Any]) -> str:
    """The verdict, with what was missing when the cell measured too little for one ("too_few": since schema 3)."""
    return r["verdict"] + (f" ({r['too_few']})" if r.get("too_few") else "")


# How to read the C/P columns, under the terminal table and the Markdown one.
RATIO_NOTE = (f"C/P is the median of the per-round ratios (C and P are timed in alternating rounds), marked '!' "
              f"outside 1 +- 5 %; the interval is its 95 % CI, or only the rounds' range when there are fewer than "
              f"{MIN_CI_ROUNDS} (the verdict is then only indicative); the verdict is parity (interval inside "
              f"0.95-1.05), C faster or C slower (interval wholly outside), else inconclusive; a cell with fewer "
              f"rounds or calls than its budget's minimum (or a single round) is inconclusive whatever its numbers "
              f"('too few').")

HEADER = ["pair", "target", "batch", "C ms p50/p90/p99", "P ms p50/p90/p99", "C/P", "C/P interval", "verdict",
          "MACs C/P",
          "GFLOP/s C / P", "of limit C / P", "IQR/p50 C / P", "reps C/P"]


def format_table(doc: dict[str, Any]) -> str:
    """The aligned terminal table plus the limits, skips and flags under it."""
    rows = [HEADER, *_rows(doc)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                   strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", limits_line(doc)]
    lines += [f"skipped {s['pair']} {s['target']}{' b' + str(s['batch']) if 'batch' in s else ''}: {s['reason']}"
              for s in doc["skipped"]]
    lines.append(RATIO_NOTE)
    return "\n".join(lines + thin_notes(doc))


def limits_line(doc: dict[str, Any]) -> str:
    """The machine's limits in one line."""
    parts = []
    for device, table in doc["machine_limit"].items():
        for precision, e in table.items():
            value = f"{e['gflops']:.0f}" if e.get("gflops") else "not native"
            parts.append(f"{device} {precision} {value}")
    unit = "GFLOP/s (int8: GOP/s)"
    return f"matmul limit ({doc['config']['threads']} threads): " + ", ".join(parts) + f" {unit}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown(doc: dict[str, Any], plots: list[str] = ()) -> str:
    """The whole report as Markdown: machine, limits, latency table, cold starts, INT8, skips, method."""
    env = doc["environment"]
    cpu = env["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    la, la_end = env.get("load_average"), env.get("load_average_end")
    summary = doc.get("summary") or summarize_doc(doc)
    parts = [
        f"# Latency benchmark: ViT_C vs ViT_P ({doc['created']}, host {doc['host']})",
        "",
        f"- Command: `{' '.join(doc['argv'])}`; wall time {doc.get('wall_seconds')} s",
        f"- CPU: {cpu['model']} (family {cpu.get('family')}, model {cpu.get('model_number')}), "
        f"{cpu.get('usable_cpus')} usable CPUs, {cpu.get('physical_cores')} physical cores; "
        f"flags: {' '.join(cpu['flags']) or 'none of interest'}",
        f"- GPU: {', '.join(g['name'] for g in env['gpus']) or 'none'}; threads per inference: {env['threads']}",
        f"- Load average (1/5/15 min) at start {_fmt_load(la)}, at end {_fmt_load(la_end)}",
        f"- Versions: {versions}; {_git(env.get('git'))}",
        f"- {limits_line(doc)}",
        f"- Convention: {doc['config']['flops_convention']}",
        "",
        "## Latency (ms), C/P ratio, achieved GFLOP/s and fraction of the matmul limit",
        "",
        _md_table(HEADER, _rows(doc)),
        "",
        RATIO_NOTE.replace("'!'", "`!`") + " MACs C/P is the analytic expectation.",
        "",
        *(line for note in thin_notes(doc) for line in (note, "")),
    ]
    parts += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    parts += ["## Headlines", ""]
    for pair, s in summary.items():
        for m, b in s["best_batch1"].items():
            parts.append(f"- {pair}: {m} best batch-1 latency {b['p50_ms']:.2f} ms ({b['target']}), "
                         f"{b['gflops']:.1f} GFLOP/s = {_pct(b['fraction_of_limit'])} of the {b['limit']} limit")
        for model in dict.fromkeys(q["model"] for q in s["int8_speedup_vs_openvino_fp32"]):
            qs = [q for q in s["int8_speedup_vs_openvino_fp32"] if q["model"] == model]
            speedups = ", ".join(f"b{q['batch']} {q['speedup']:.2f}x" for q in qs)
            parts.append(f"- {pair}: {model} OpenVINO INT8 speed-up over OpenVINO fp32: {speedups}"
                         + _int8_accuracy(doc, model))
        # A flag goes by the point estimate: a cell too short to conclude (inconclusive, or only indicative: the range
        # of a few rounds, as every --quick cell) is said apart, with its kind (a smoke test, not a finding).
        findings = [r for r in s["ratios"] if r["flagged"] and _finding(r)]
        loose = [r for r in s["ratios"] if r["flagged"] and not _finding(r)]
        if findings:
            parts.append(f"- {pair}: C/P outside +-5 %: {', '.join(_flag(r) for r in findings)}")
        if loose:
            parts.append(f"- {pair}: C/P outside +-5 % in cells too short to conclude (not a finding): "
                         f"{', '.join(_unconcluded(r) for r in loose)}")
    prof = [b for b in doc.get("breakdown", []) if "error" not in b]
    if prof:
        parts += ["", "## Where the time goes (OpenVINO per-op profile)", "",
                  "GEMM GFLOP/s = 2 * MACs * batch / time in matmul-class ops (FullyConnected, MatMul, Convolution, "
                  "attention); the rest of the time is LayerNorm, GELU, adds, transposes and reorders.", ""]
        parts.append(_md_table(
            ["model", "target", "batch", "profiled ms", "matmul-class share", "GEMM GFLOP/s", "GEMM of limit",
             "largest other ops (ms)"],
            [[b["model"], b["target"], str(b["batch"]), f"{b['profiled_ms']:.2f}", _pct(b["matmul_share"]),
              f"{b['gemm_gflops']:.1f}" if b["gemm_gflops"] else "-", _pct(b["gemm_fraction_of_limit"]),
              ", ".join(f"{k} {v:.2f}" for k, v in list(_other_ops(b).items())[:3])] for b in prof]))
    parts += ["", "## Cold start (load, compile and first batch-1 result, in-process, warm file cache)", ""]
    parts.append(_md_table(["model", "target", "seconds"],
                           [[c["model"], c["target"], f"{c['seconds']:.2f}"] for c in doc["cold_start"]]))
    if doc["skipped"]:
        parts += ["", "## Not run", ""]
        parts += [f"- {s['pair']} {s['target']}{' b' + str(s['batch']) if 'batch' in s else ''}: {s['reason']}"
                  for s in doc["skipped"]]
    parts += ["", "## Compact table (for the README)", "", readme_table(doc)]
    parts += ["", "## Models", ""]
    parts.append(_md_table(["model", "weights", "GMACs/image", "image", "checkpoint", "bundle"],
                           [[m, v["source"], f"{v['macs_per_image'] / 1e9:.3f}", str(v["image_size"]),
                             _rel(v["checkpoint"]), _rel(v["bundle"])] for m, v in doc["models"].items()]))
    return "\n".join(parts) + "\n"


def _other_ops(b: dict[str, Any]) -> dict[str, float]:
    from benchmarks.breakdown import is_matmul_op

    return {k: v for k, v in b["top_ops_ms"].items() if not is_matmul_op(k)}


def readme_table(doc: dict[str, Any]) -> str:
    """A compact Markdown table for the README: p50 of C and P, their ratio and the fraction of the limit."""
    rows = []
    for r in doc["ratios"]:
        c = _by(doc["results"], pair=r["pair"], target=r["target"], batch=r["batch"], model=r["c_model"])[0]
        p = _by(doc["results"], pair=r["pair"], target=r["target"], batch=r["batch"], model=r["p_model"])[0]
        rows.append([r["pair"], r["target"], str(r["batch"]), _ms(c["latency_ms"]["p50"]), _ms(p["latency_ms"]["p50"]),
                     f"{r['ratio']:.2f}" + (" !" if r["flagged"] else ""), _verdict(r),
                     f"{_pct(c['fraction_of_limit'])} / {_pct(p['fraction_of_limit'])}"])
    return _md_table(["pair", "runtime", "batch", "ViT_C p50 ms", "ViT_P p50 ms", "C/P", "verdict", "of limit C / P"],
                     rows)


def _int8_accuracy(doc: dict[str, Any], model: str) -> str:
    """"; INT8 accuracy delta ..." with the caveat that applies (random weights, or the serving gate refuses it)."""
    par = (doc["models"].get(model) or {}).get("int8_parity") or {}
    if par.get("accuracy_delta") is None:
        return ""
    text = (f"; INT8 accuracy delta {par['accuracy_delta'] * 100:+.2f} points on {par.get('val_samples')} "
            f"{par.get('dataset')} val images, top-1 agreement with fp32 {par.get('top1_agreement', 0):.1%}")
    if (doc["models"].get(model) or {}).get("source") == "random-init":
        return text + " (random-init weights: accuracy not meaningful)"
    if par.get("passes_serving_gate") is False:
        return text + f" (the serving gate would refuse it: {'; '.join(par['serving_gate_failures'])})"
    return text


def _rel(path: str) -> str:
    """A path relative to the repository when inside it (reports are read on other machines)."""
    repo = str(Path(__file__).resolve().parents[1]) + "/"
    return path[len(repo):] if path.startswith(repo) else path


def _git(git: dict[str, Any] | None) -> str:
    """`git 0123abcd4567 (dirty)`, or why there is no commit (an installed copy, an unpacked sdist)."""
    commit = (git or {}).get("commit")
    if not commit:
        return "git: no commit (not run from a git checkout of vitc)"
    return f"git {commit[:12]}" + (" (dirty)" if (git or {}).get("dirty") else "")


def _fmt_load(la: list[float] | None) -> str:
    return "n/a" if not la else "/".join(f"{x:.2f}" for x in la)


def out_dir_problem(path: Path) -> str | None:
    """Why files cannot be written into directory `path`, or None. Tried for real (the directory created, a
    temporary file written in it, then both removed again) before a run, so a benchmark never measures for minutes
    and then fails to save its results."""
    for p in (path, *path.parents):  # the nearest thing that exists decides
        if os.path.lexists(p):
            if not p.is_dir():
                what = "a broken link" if not p.exists() else "a file"
                return f"{p} is {what}, not a directory" if p == path else f"{p} (above it) is {what}"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"{p} is not writable"
            break
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:  # /proc, a read-only mount, a full disk, root's own access rules
        return f"cannot write into it: {exc.strerror or exc}"
    finally:
        for p in missing:  # what the check created: a run refused later leaves nothing behind
            with contextlib.suppress(OSError):
                p.rmdir()
    return None


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Name `path` in an OSError raised while writing it: a failed write() (a full disk) names no file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def save_failed(exc: OSError) -> WorkFailed:
    """The one line for results that measured but could not be saved (exit 1: the work failed, not the input)."""
    hint = "the measurements are printed above"
    return machine_error(exc, hint) or WorkFailed(f"cannot save the results: {exc.strerror or exc}"
                                                  + (f": {exc.filename}" if exc.filename else "") + f": {hint}")


def stem_name(doc: dict[str, Any], suffix: str = "") -> str:
    """`<date>-<HHMM>-<host><suffix>` from the document's creation time."""
    created = dt.datetime.strptime(doc["created"], "%Y-%m-%dT%H:%M:%SZ")
    return f"{created:%Y-%m-%d-%H%M}-{doc['host']}{suffix}"


def unused_stem(out_dir: Path, stem: str, tails: tuple[str, ...]) -> str:
    """`stem`, else `stem-2`, `stem-3`, ...: the first for which no `<stem><tail>` exists in `out_dir`, so a second
    run in the same minute never replaces the first one's results."""
    n = 1
    while any(os.path.lexists(out_dir / f"{stem if n == 1 else f'{stem}-{n}'}{tail}") for tail in tails):
        n += 1
    return stem if n == 1 else f"{stem}-{n}"


def publish(files: dict[Path, bytes], what: str) -> list[Path]:
    """Put every file (path -> content, rendered beforehand) in place, or none; returns the paths.

    All are staged first (written and synced beside their names), where a Ctrl-C, a SIGTERM or a full disk still
    leaves nothing: one result's JSON without its Markdown and plots would read as a whole run, and take its name
    from the next. Then all are renamed into place as one commit (`committing`): a signal waits for the renames."""
    staged: dict[Path, str] = {}
    try:
        for path, data in files.items():
            with naming(path):
                ensure_dir(path.parent)
                staged[path] = stage(path, data)
        with committing(what):
            for path, tmp in list(staged.items()):
                with naming(path):
                    os.replace(tmp, path)
                del staged[path]
    finally:
        for tmp in staged.values():  # what was staged and never published
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return list(files)


def write_reports(doc: dict[str, Any], out_dir: Path, suffix: str = "", plots: bool = True) -> list[Path]:
    """JSON, Markdown and PNG plots into `out_dir`, all rendered first, then published together; the paths."""
    from benchmarks.plots import plot_latency, plot_ratios

    stem = unused_stem(out_dir, stem_name(doc, suffix), (".json", ".md", "-latency.png", "-ratio.png"))
    doc["summary"] = summarize_doc(doc)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    pngs = {out_dir / f"{stem}-{name}.png": plot(doc)
            for name, plot in (("latency", plot_latency), ("ratio", plot_ratios)) if plots}
    files = {json_path: strict_json_bytes(json.loads(json.dumps(doc, default=str))),
             md_path: markdown(doc, [p.name for p in pngs]).encode(), **pngs}
    return publish(files, f"the results {stem} in {out_dir}")


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
