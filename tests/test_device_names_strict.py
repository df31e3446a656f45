"""Device names and GPU indices as torch takes them: ASCII digits without a leading zero, so a name that passes the
settings cannot fail later at model load; and a paper study whose compiled timing hits dynamo's recompile limit
records the pair as not measured instead of crashing after all its training."""

from __future__ import annotations

import argparse
import json

import pytest

from models.device import is_device, is_gpu_index


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:10", "cuda:99"])
def test_device_names_torch_takes_are_accepted(name):
    torch = pytest.importorskip("torch")
    torch.device(name)  # torch agrees
    assert is_device(name)


@pytest.mark.parametrize("name", ["cuda:01", "cuda:00", "cuda:\u0663", "cuda:\uff11", "cuda:100", "cuda:-1", "CUDA",
                                  " cuda", "cuda\n", ""])
def test_device_names_torch_refuses_are_refused(name):
    assert not is_device(name)


@pytest.mark.parametrize(("text", "ok"), [("0", True), ("12", True), ("01", False), ("\u0663", False), ("100", False),
                                          ("-1", False)])
def test_gpu_indices(text, ok):
    assert is_gpu_index(text) is ok


def test_the_sweeps_devices_take_gpu_indices_only():
    from train.sweep.__main__ import _devices

    assert _devices("0,1") == ("0", "1")
    for bad in ("01", "\u0663", "100"):
        with pytest.raises(argparse.ArgumentTypeError, match="GPU indices 0 to 99"):
            _devices(bad)


def test_a_recompile_limit_hit_in_the_studys_runtime_step_is_recorded_not_raised(tmp_path, monkeypatch):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from train.sweep import report, runtime, study
    from train.sweep.presets import make_config

    def hits_the_limit(*args, **kwargs):
        raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")

    monkeypatch.setattr(runtime, "batch_problem", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "measure", hits_the_limit)
    monkeypatch.setattr(runtime, "machine", lambda device: {"device": device})
    cfg = make_config("reduced")
    study.measure_runtime(cfg, tmp_path, [])
    doc = json.loads((tmp_path / report.RUNTIME_FILE).read_text())
    (why,) = doc["not_measured"].values()
    assert doc["rows"] == [] and why.startswith("FailOnRecompileLimitHit: recompile_limit reached")
