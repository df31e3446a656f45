"""serve.launch starts `python -m serve` in the directory its code is in, so its caller's relative paths are made
absolute first: `benchmarks.load --start --model exports/x` from anywhere but the checkout's root (and from any
pip-installed copy) said "bundle directory not found"."""

from __future__ import annotations

import os

import fake_runtime
import httpx
from test_serve_fixtures import start_server


def test_relative_model_paths_are_the_callers(tmp_path, monkeypatch):
    fake_runtime.write_bundle(tmp_path / "exports" / "b")
    monkeypatch.chdir(tmp_path)
    with start_server(["--model", "fake=exports/b", "--backend", "fake"], tmp_path / "server.log",
                      fake_runtime.server_env(tmp_path)) as server:
        assert httpx.get(server.url + "/v2/models/fake/ready", timeout=10).status_code == 200


def test_absolute_paths_handles_every_spelling(tmp_path, monkeypatch):
    from serve.launch import absolute_paths

    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    assert absolute_paths(["--model", "x", "--model", "n=r/y", "--model-dir=md", "--backend", "fake",
                           "--model-repository", "/abs", "--model"]) == [
        "--model", f"{here}/x", "--model", f"n={here}/r/y", f"--model-dir={here}/md", "--backend", "fake",
        "--model-repository", "/abs", "--model"]
