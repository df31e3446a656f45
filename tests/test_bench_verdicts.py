"""The latency benchmark's C/P verdicts need the rounds and calls its budget asks for, its ratio plot says what it
plots and tells a 95 % CI from a mere range, its cells keep their raw samples, and every committed result stays
readable. Fast: the timing is a stand-in."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import benchmarks.plots
import benchmarks.suite
from benchmarks.measure import QUICK, PairTiming
from benchmarks.runners import Opened, Target
from benchmarks.stats import ratio_summary
from benchmarks.suite import SuiteConfig, _run_target
from models import get_config

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "data" / "bench-results-mini.json"


def test_too_few_rounds_or_calls_give_no_direction():
    enough = ratio_summary([1.0] * 5, [1.0] * 5, round_ratios=[0.7, 0.72], min_rounds=2, min_reps=5)
    assert enough["verdict"] == "indicative: C faster" and enough["too_few"] is None
    rounds = ratio_summary([1.0] * 9, [1.0] * 9, round_ratios=[0.7, 0.72], min_rounds=3, min_reps=5)
    assert rounds["verdict"] == "inconclusive" and rounds["too_few"] == "too few: 2 rounds of 3"
    calls = ratio_summary([1.0] * 4, [1.0] * 60, round_ratios=[0.6] * 8, min_rounds=2, min_reps=5)
    assert calls["verdict"] == "inconclusive" and calls["too_few"] == "too few: 4/60 calls of 5"
    assert not calls["firm"] and calls["interval_kind"] == "95% CI"  # 8 rounds, but C's calls were too few
    assert ratio_summary([2.0], [1.0])["verdict"] == "inconclusive"  # one sample each: no interval at all


def _prepared(model: str, stem: str) -> SimpleNamespace:
    config = get_config(model)
    manifest = SimpleNamespace(config=config, input=SimpleNamespace(sample_shape=(3, 32, 32), max_batch=8))
    return SimpleNamespace(pair="micro", model=model, stem=stem, source="random-init", manifest=manifest,
                           bundle=Path("unused"))


class _Bar:
    def set_description_str(self, _s: str) -> None: ...
    def update(self, _n: int = 1) -> None: ...


def test_a_cell_timed_once_is_inconclusive_and_keeps_its_samples(monkeypatch):
    """The review's quick run: ViT_C timed once (the 0.6 s budget ran out after one round), ViT_P 63 times, and
    the table said "0.887 ... (range of 1 round) indicative: C faster" from a zero-width interval."""
    c_s = [0.01]
    p_s = [0.0113 + 1e-5 * i for i in range(63)]

    def time_pair(_c, _p, _inputs, _budget):
        return PairTiming(c=c_s, p=p_s, round_ratios=[0.887], rounds=1, seconds=0.7, hit_time_limit=True)

    def open_target(target, *_args):
        return Opened(target, lambda x: x, lambda: None, 0.1, {"threads": 1})

    monkeypatch.setattr(benchmarks.suite, "time_pair", time_pair)
    monkeypatch.setattr(benchmarks.suite, "open_target", open_target)
    cfg = SuiteConfig(pairs=("micro",), batch_sizes=(1,), targets=(Target("torch", "fp32"),), threads=1,
                      budget=QUICK, quick=True, progress=False)
    doc = {"results": [], "ratios": [], "cold_start": [], "skipped": []}
    limits = {"cpu": {"fp32": {"gflops": 100.0, "native": True}}}
    _run_target(cfg, _prepared("vit_c_micro", "conv"), _prepared("vit_p_micro", "patchify"), cfg.targets[0], limits,
                doc, _Bar())
    (ratio,) = doc["ratios"]
    assert ratio["ratio"] == 0.887 and ratio["interval"] == [0.887, 0.887]
    assert ratio["verdict"] == "inconclusive" and ratio["too_few"] == "too few: 1 round of 2, 1/63 calls of 5"
    c_cell, p_cell = doc["results"]
    assert c_cell["samples_ms"] == {"n": 1, "every": 1, "kept": 1, "values": "10"}
    kept = [float(v) for v in p_cell["samples_ms"]["values"].split()]
    assert kept == pytest.approx([s * 1e3 for s in p_s], rel=1e-4)
    assert float(np.percentile(kept, 90)) == pytest.approx(p_cell["latency_ms"]["p90"], rel=1e-4)


def test_raw_samples_are_bounded_and_keep_their_order():
    from benchmarks.stats import MAX_RAW_SAMPLES, raw_samples

    r = raw_samples(np.arange(1, 2501, dtype=float))
    assert r["n"] == 2500 and r["every"] == 3 and r["kept"] == 834 <= MAX_RAW_SAMPLES
    values = r["values"].split()
    assert values[:3] == ["1", "4", "7"] and values[-1] == "2500"
    assert raw_samples([0.0123456789, 1234.56789])["values"] == "0.012346 1234.6"


def _figure(monkeypatch, doc: dict) -> object:
    figures = []
    monkeypatch.setattr(benchmarks.plots, "png", lambda fig: figures.append(fig) or b"")
    benchmarks.plots.plot_ratios(doc)
    return figures[0]


def test_the_ratio_plot_says_what_it_plots_and_marks_ranges_apart_from_cis(monkeypatch):
    """The axis said "C/P ratio (p50)" for the median of per-round ratios, and a 2-round range was drawn as the
    same capped bar as a 95 % CI."""
    doc = json.loads(MINI.read_text())
    for r in doc["ratios"]:
        rounds = r["round_ratios"][:2] if r["batch"] == 1 else r["round_ratios"] * 3
        r.update(ratio_summary([1.0] * 9, [1.0] * 9, rounds))
    fig = _figure(monkeypatch, doc)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "C/P latency: median of per-round ratios"
    bars = {}
    for container in ax.containers:
        _, caps, (lines,) = container.lines
        bars.setdefault(lines.get_gid(), []).append((len(caps), lines.get_linestyle()))
    assert bars.keys() == {"ci95", "range"}
    assert all(caps == 2 and style == [(0.0, None)] for caps, style in bars["ci95"])  # solid, capped
    assert all(caps == 0 and style != [(0.0, None)] for caps, style in bars["range"])  # dotted, no caps
    assert any("range of < 6 rounds" in t.get_text() for t in ax.texts)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _committed() -> list[Path]:
    results = REPO / "benchmarks" / "results"  # the sdist holds no results: then only the test copy
    return [MINI, *sorted(p for p in results.glob("*.json") if p.stem[:4].isdigit() and p.stem.endswith("-vm"))]


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.name)
def test_committed_results_of_every_schema_stay_readable(path, monkeypatch):
    """Schema 1 (the ratio of the medians), 2 (median per-round ratio) and 3 (too_few, samples_ms) all render."""
    from benchmarks.report import format_table, markdown

    doc = json.loads(path.read_text())
    md = markdown(doc)
    assert "## Latency (ms)" in md and "git None" not in md and format_table(doc)
    fig = _figure(monkeypatch, doc)
    label = fig.axes[0].get_ylabel()
    per_round = {r.get("estimator") for r in doc["ratios"]} == {"median per-round ratio"}
    assert label == ("C/P latency: median of per-round ratios" if per_round else "C/P latency: ratio of the p50s")
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_headlines_say_a_flagged_cell_too_short_to_conclude_apart():
    """A cell 'inconclusive (too few: 1 round of 6)' was listed among the C/P findings by its point estimate."""
    from benchmarks.report import markdown

    doc = json.loads((REPO / "benchmarks" / "results" / "2026-12-05-0235-vm.json").read_text())
    firm, loose = [r for r in doc["ratios"] if r["pair"] == "mini"][:2]
    firm.update(ratio=0.90, flagged=True, verdict="C faster")
    loose.update(ratio=0.92, flagged=True, verdict="inconclusive")
    for r in doc["ratios"]:
        if r is not firm and r is not loose:
            r["flagged"] = False
    doc.pop("summary")  # rebuilt from the ratios, as a run writes it
    lines = [ln for ln in markdown(doc).splitlines() if "C/P outside" in ln and ln.startswith("- ")]
    cell = "{target} b{batch}: {ratio:.3f}"
    assert lines == [f"- mini: C/P outside +-5 %: {cell.format(**firm)}",
                     f"- mini: C/P outside +-5 % in cells too short to conclude (not a finding): "
                     f"{cell.format(**loose)} (inconclusive)"], lines
