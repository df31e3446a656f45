"""The C/P spread of fewer rounds than a 95 % interval needs is labelled as the rounds' range, as benchmarks.latency
labels it (hCD 3: `--rounds 2` printed "(95 % lo..hi)" beside "fewer than 6 for a 95 % interval"). Constructed
rounds: nothing is timed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from train.sweep import report, runtime

ROOT = Path(__file__).resolve().parents[1]
TWO = [0.914, 0.987]
NINE = [0.95, 0.97, 0.96, 0.98, 0.96, 0.97, 0.95, 0.96, 0.97]


def _row(ratios: list[float]) -> dict:
    return {"what": "train_step", "device": "cpu", "layout": "channels_last", "compiled": False, "batch": 16,
            "ms_vit_c": 10.7, "ms_vit_p": 11.25, "ratio": sorted(ratios)[len(ratios) // 2], "round_ratios": ratios,
            "rounds": len(ratios), "steps_per_round": 3}


@pytest.mark.parametrize("ratios, label", [
    (TWO, "(range of 2 rounds 0.914..0.987)"),
    (TWO[:1], "(range of 1 round 0.914..0.914)"),
    (NINE, "(95 % 0.950..0.970)"),
])
def test_the_command_labels_a_range_as_a_range(monkeypatch, capsys, ratios, label):
    monkeypatch.setattr(runtime, "measure", lambda *_a, **_k: [_row(ratios)])
    assert runtime.main(["--models", "vit_c_micro,vit_p_micro", "--rounds", str(len(ratios)), "--batch", "16"]) == 0
    line = capsys.readouterr().out.strip()
    assert label in line, line
    assert ("(95 %" in line) == (len(ratios) >= 6), line


def test_the_reports_runtime_table_labels_a_range_as_a_range():
    shipped = json.loads((ROOT / "results" / "paper-reduced" / "summary.json").read_text())
    assert "(range of" not in report.markdown(shipped, [])  # 9 rounds each: 95 % intervals, as shipped
    summary = copy.deepcopy(shipped)
    for r in summary["runtime"]["rows"]:
        r["round_ratios"] = TWO
    table = [ln for ln in report.markdown(summary, []).splitlines() if ln.startswith("| vit_c_nano / vit_p_nano |")]
    assert table and all("| 0.914..0.987 (range of 2 rounds) |" in ln for ln in table), table


@pytest.mark.parametrize("ratios, label, rounds", [
    (TWO, "(range of 2 rounds 0.91..0.99)", "not judged: 2 rounds,"),
    (TWO[:1], "(range of 1 round 0.91..0.91)", "not judged: 1 round,"),
    (NINE, "(95 % 0.95..0.97)", None),
])
def test_the_claims_table_labels_a_range_as_a_range(ratios, label, rounds):
    from train.sweep.claims import runtime_claim

    text = runtime_claim([_row(ratios)], flops_ratio=1.0)["measured"]
    assert label in text, text
    assert rounds is None or rounds in text, text
