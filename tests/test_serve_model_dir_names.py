"""--model-dir names every bundle by its directory, as Triton names a model: at startup as when it is loaded later
(hCD 1: a startup named it by its manifest, a load by its directory, so a restart renamed it or refused to start)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fake_runtime
import pytest
import test_repository_lifecycle as lifecycle
from test_repository_lifecycle import client

from serve.errors import ServeError
from serve.launch import REPO
from serve.registry import load_models, model_sources
from serve.settings import Settings

fake = lifecycle.fake  # the fixture: the fake runtime registered
_series = lifecycle._series

def _settings(model_dir: Path, **kw) -> Settings:
    return Settings(model_control_mode="explicit",
                    model_dir=model_dir, backend="fake", access_log=False, graceful_timeout_s=5, **kw)


def _names(c) -> dict[str, list[str]]:  # noqa: ANN001 - an httpx client
    """The model names every listing gives: /v1, the repository index, and each model's v2 metadata."""
    v1 = sorted(m["name"] for m in c.get("/v1/models").json()["models"])
    return {"v1": v1, "index": sorted(e["name"] for e in c.post("/v2/repository/index").json()),
            "v2": sorted(c.get(f"/v2/models/{n}").json()["name"] for n in v1)}


def test_a_bundle_is_served_under_its_directory_name_not_its_manifests(fake, tmp_path):
    models = tmp_path / "models"
    fake_runtime.write_bundle(models / "animals")  # its manifest names it "legacy"
    with client(_settings(models)) as c:
        assert _names(c) == {"v1": ["animals"], "index": ["animals"], "v2": ["animals"]}
        assert len(_series(c, "vitc_model_info", "animals")) == 1 and not _series(c, "vitc_model_info", "legacy")
        assert c.get("/v2/models/legacy").status_code == 404
    # --model PATH (no NAME=) keeps the manifest's name, as before.
    served = load_models(Settings(models=[str(models / "animals")], backend="fake"))
    try:
        assert list(served) == ["legacy"]
    finally:
        served["legacy"].backend.close()


def test_a_copy_beside_it_serves_both_and_a_restart_keeps_the_names_a_load_gave(fake, tmp_path):
    models = tmp_path / "models"
    fake_runtime.write_bundle(models / "a")
    settings = _settings(models)
    with client(settings) as c:
        shutil.copytree(models / "a", models / "a-v2")  # the same manifest name
        assert c.post("/v2/repository/models/a-v2/load").status_code == 200
        loaded = _names(c)
    assert loaded == {"v1": ["a", "a-v2"], "index": ["a", "a-v2"], "v2": ["a", "a-v2"]}
    with client(settings) as c:  # the restart: no "two models are named 'legacy'", the same names
        assert _names(c) == loaded
        assert c.post("/v2/repository/models/a-v2/load").status_code == 200


def test_a_directory_name_no_model_can_have_is_refused_at_start_and_on_load(fake, tmp_path):
    models = tmp_path / "models"
    fake_runtime.write_bundle(models / "a")
    with client(_settings(models)) as c:
        fake_runtime.write_bundle(models / "odd+name")
        r = c.post("/v2/repository/models/odd+name/load")
        assert r.status_code == 400 and r.json()["error"].startswith("model directory 'odd+name' is not served: "
                                                                   "a model name is 1..128 of "), r.text
        assert _names(c)["index"] == ["a"]
    run = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(models), "--backend", "fake"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **fake_runtime.server_env(tmp_path)})
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip()
    assert "\n" not in line and line.startswith("python -m serve: error: "), run.stderr
    assert str(models / "odd+name") in line and "a model name is 1..128 of" in line, line
    assert "rename the directory" in line and f"--model NAME={models / 'odd+name'}" in line, line
    # Served as --model names it, the directory is no longer refused.
    served = load_models(_settings(models, models=[f"odd={models / 'odd+name'}"]))
    try:
        assert sorted(served) == ["a", "odd"]
    finally:
        for m in served.values():
            m.backend.close()


def test_a_clash_with_a_named_model_says_how_to_resolve_it(fake, tmp_path):
    models = tmp_path / "models"
    fake_runtime.write_bundle(models / "a")
    other = fake_runtime.write_bundle(tmp_path / "other")
    with pytest.raises(ServeError) as err:
        load_models(_settings(models, models=[f"a={other}"]))
    said = str(err.value)
    assert said.startswith(f"two models are named 'a' ({other} and {models / 'a'}); "), said
    assert "rename the directory" in said and "--model NAME=PATH" in said and "rename one" not in said, said
    sources = model_sources(Settings(model_dir=models))
    assert [(s.name, s.describe()) for s in sources] == [("a", str(models / "a"))]  # named as the flag gives it
