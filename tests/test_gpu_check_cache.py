"""`make gpu-check`'s bundle cache, without a GPU: under the current directory (or --cache), never in the package
directory (site-packages for an installed vitc), and checked for writability before the first step."""

from __future__ import annotations

import shlex

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import GPU, GPU_FULL, SMOKE, Budget


class Reached(Exception):
    """main() got as far as running the steps."""


@pytest.fixture
def no_steps(monkeypatch):
    """main() with a GPU that is never used: run() records the cache it was given instead of running."""
    seen: dict = {}

    def run(device, sizes, out, work, log=print, budget=None, cache=None):
        seen.update(sizes=sizes, cache=cache, work=work)
        raise Reached

    monkeypatch.setattr(gpu_check, "run", run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return seen


def _latency_cache(doc: dict) -> str:
    (step,) = [s for s in doc["steps"] if s["name"] == "latency-1"]
    args = shlex.split(step["command"])
    return args[args.index("--cache") + 1]


def test_the_gpu_runs_cache_is_under_the_current_directory_not_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a budget already spent: nothing is started, every step is recorded as not run, with its command
    budget = Budget(30, GPU.shares, reserve_s=30, min_step_s=10)
    doc = gpu_check.run("cpu", GPU, tmp_path / "out", tmp_path / "work", log=lambda m: None, budget=budget)
    assert all(s["status"] == "not run" for s in doc["steps"])
    assert _latency_cache(doc) == str(tmp_path / "exports" / "gpu-check")
    assert not _latency_cache(doc).startswith(str(gpu_check.REPO) + "/")


def test_main_passes_the_cache_it_checked(tmp_path, monkeypatch, no_steps):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Reached):
        gpu_check.main(["--out", "results"])
    assert no_steps["sizes"] is GPU and no_steps["cache"] == tmp_path / "exports" / "gpu-check"
    with pytest.raises(Reached):
        gpu_check.main(["--full", "--out", "results", "--cache", "cache"])
    assert no_steps["sizes"] is GPU_FULL and no_steps["cache"] == tmp_path / "cache"
    # the smoke run keeps its own cache under its work directory: the current directory is not asked for one
    (tmp_path / "exports").write_text("a file where the default cache would go")
    with pytest.raises(Reached):
        gpu_check.main(["--device", "cpu", "--smoke", "--out", "results"])
    assert no_steps["sizes"] is SMOKE and no_steps["cache"] is None
    assert gpu_check.bundle_cache(SMOKE, tmp_path / "w", None) == tmp_path / "w" / "bench"


@pytest.mark.parametrize("argv", [[], ["--cache", "exports/gpu-check"]])
def test_an_unwritable_cache_is_refused_with_one_line_before_any_step(tmp_path, monkeypatch, capsys, no_steps, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").write_text("a file where the cache would go")
    assert gpu_check.main(["--out", str(tmp_path / "results"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m benchmarks.gpu_check: error: --cache ")
    assert f"{tmp_path / 'exports'} (above it) is a file" in err[0]
    assert not no_steps and not (tmp_path / "results").exists()


def test_a_cache_that_cannot_be_created_is_refused(tmp_path, capsys, no_steps):
    assert gpu_check.main(["--out", str(tmp_path / "results"), "--cache", "/proc/vitc-gpu-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache /proc/vitc-gpu-check: " in err[0] and not no_steps
