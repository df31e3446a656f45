"""`make gpu-check` (benchmarks/gpu_check.py): every step of the GPU path, small on the CPU; the real one on a GPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.gpu_check import main

STEPS = ["train", "ddp", "export", "parity-on-device", "latency-1", "serve-under-load"]


def _doc(out) -> dict:
    (path,) = out.glob("*-gpu-check.json")
    return json.loads(path.read_text())


def test_smoke_run_goes_through_every_step_on_the_cpu(tmp_path, monkeypatch):
    # Every step inherits this: torch's OpenMP threads otherwise spin while they wait for work, and on a CPU shared
    # with the other test worker a spinning pool starves the busy one (the export and latency steps ran twice as
    # long). The training steps set the same themselves (train/options.py); a policy the caller set is kept.
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    out = tmp_path / "out"
    assert main(["--device", "cpu", "--smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    doc = _doc(out)
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == STEPS and doc["passed"] and doc["smoke"]
    assert all(s["rc"] == 0 for s in steps.values()), [s["output_tail"] for s in steps.values() if s["rc"]]
    assert steps["train"]["facts"]["steps"] == 3 and steps["train"]["facts"]["device_name"] == "cpu"
    # torchrun with one process joins a real process group (gloo here, NCCL on a GPU).
    assert steps["ddp"]["facts"]["ddp_backend"] == "gloo" and steps["ddp"]["facts"]["world_size"] == 1
    assert {"torch-fp32", "torch-bf16", "torch-fp16"} <= set(steps["export"]["facts"])
    parity = steps["parity-on-device"]["facts"]
    assert set(parity) == {"fp32", "bf16", "fp16"} and all(p["passed"] for p in parity.values())
    assert parity["fp32"]["top1_agreement"] == 1.0
    latency = steps["latency-1"]["facts"]
    assert "vit_c_micro torch-fp32" in latency["targets"] and (out / steps["latency-1"]["report"]).exists()
    served = steps["serve-under-load"]["facts"]
    assert served["closed"][0]["concurrency"] == 1 and served["closed"][0]["throughput_rps"] > 0
    md = next(out.glob("*-gpu-check.md")).read_text()
    assert "**passed**" in md and "| parity-on-device | passed | 0 |" in md
    # every step ran within its share of the budget, and the budget is on record
    assert doc["cut"] == [] and doc["budget_s"] == 1800
    assert all(s["status"] == "passed" and 0 < s["seconds"] <= s["allowed_s"] for s in steps.values())


def test_without_a_gpu_the_real_check_refuses_with_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_whole_gpu_path(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # Everything under tmp_path: the latency bundles too (--cache), not exports/gpu-check/ in the checkout, and the
    # current directory moved there so a default that slipped back would land there as well.
    monkeypatch.chdir(tmp_path)
    rc = main(["--out", str(out), "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache")])
    doc = _doc(out)
    assert rc == 0, [s["output_tail"] for s in doc["steps"] if s["rc"]]
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["ddp"]["facts"]["ddp_backend"] == "nccl"
    assert steps["train"]["facts"]["compile"] is True
    assert any((tmp_path / "cache").iterdir()) and not (tmp_path / "exports").exists()
