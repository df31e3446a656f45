"""--model-control-mode (hEX 2), as Triton's: `none`, the default, refuses the repository API's load and unload with
Triton's status and words; `explicit` allows them. And strict readiness: a server that serves no model is not ready."""

from __future__ import annotations

from pathlib import Path

import fake_runtime
import httpx
import pytest
from test_repository_lifecycle import CONFIG, NAME, add_version, client, fake, repo  # noqa: F401 - fixtures

from serve.__main__ import build_parser, settings_args
from serve.errors import ServeError
from serve.launch import ServerProcess
from serve.registry import model_sources
from serve.routes.v2 import CONTROL_REFUSED
from serve.settings import Settings


def _settings(root: Path, **kw) -> Settings:
    return Settings(model_repository=root, access_log=False, graceful_timeout_s=5, **kw)


def test_by_default_load_and_unload_are_refused_as_triton_refuses_them(fake, repo):  # noqa: F811
    """Triton's default mode answers UNAVAILABLE (HTTP 503) "explicit model load / unload is not allowed ..."."""
    with client(_settings(repo)) as c:
        for action in ("load", "unload"):
            r = c.post(f"/v2/repository/models/{NAME}/{action}")
            assert r.status_code == 503 and r.json() == {"error": CONTROL_REFUSED}, r.text
            assert "retry-after" not in r.headers  # it will not change without a restart
        assert CONTROL_REFUSED.startswith("explicit model load / unload is not allowed")
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # still served
        assert c.post("/v2/repository/index").status_code == 200  # the index is no control
        assert c.get("/v2/health/ready").json() == {"ready": True}


def test_explicit_mode_loads_and_unloads_and_a_server_serving_nothing_is_not_ready(fake, repo):  # noqa: F811
    with client(_settings(repo, model_control_mode="explicit")) as c:
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        r = c.get("/v2/health/ready")
        assert r.status_code == 400 and r.json() == {"ready": False}  # every model unloaded: nothing to serve
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert c.get("/v2/health/ready").json() == {"ready": True}
    with client(_settings(repo, model_control_mode="explicit", strict_readiness=False)) as c:
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200  # ready once started, whatever the models' state


def test_the_mode_is_a_flag_and_a_variable_and_nothing_else(monkeypatch):
    assert Settings().model_control_mode == "none"
    assert Settings(**settings_args(["--model-control-mode", "explicit"])).model_control_mode == "explicit"
    monkeypatch.setenv("VITC_MODEL_CONTROL_MODE", "explicit")
    assert Settings().model_control_mode == "explicit"
    monkeypatch.setenv("VITC_MODEL_CONTROL_MODE", "poll")  # Triton's third mode: vitc does not watch the repository
    with pytest.raises(ValueError, match="model_control_mode"):
        Settings()
    assert "--model-control-mode {none,explicit}" in build_parser().format_help().replace("\n", " ")


@pytest.mark.parametrize("given, mode", [("EXPLICIT", "explicit"), ("Explicit", "explicit"), ("None", "none"),
                                         ("NONE", "none")])
def test_the_mode_is_read_in_any_case_as_triton_lowercases_it(monkeypatch, given, mode):
    """hFB 5: Triton's material writes --model-control-mode=EXPLICIT, which was refused."""
    assert Settings(**settings_args([f"--model-control-mode={given}"])).model_control_mode == mode
    monkeypatch.setenv("VITC_MODEL_CONTROL_MODE", given)
    assert Settings().model_control_mode == mode


def test_explicit_mode_starts_on_an_empty_repository_not_ready_until_a_model_is_loaded(fake, tmp_path):  # noqa: F811
    """hFB 6: as Triton's explicit mode, a server may start with no model and have one loaded later (it exited 2,
    'no models to serve'); strict readiness keeps it out of service until then."""
    root = tmp_path / "repo"
    root.mkdir()
    with ServerProcess(["--model-repository", str(root), "--model-control-mode", "explicit"], tmp_path / "server.log",
                       fake_runtime.server_env(tmp_path)) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/v2/health/ready").status_code == 400
        assert c.post("/v2/repository/index").json() == []
        add_version(root, NAME, "1")
        (root / NAME / "config.pbtxt").write_text(CONFIG)
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 200, r.text
        assert c.get("/v2/health/ready").json() == {"ready": True}
    assert '"no models to serve yet"' in server.logs() and "Traceback" not in server.logs()


def test_an_empty_model_directory_is_refused_but_in_explicit_mode(fake, tmp_path, caplog):  # noqa: F811
    """Outside explicit mode nothing could ever be served: the start is refused, as before."""
    (tmp_path / "md").mkdir()
    with pytest.raises(ServeError, match="no models to serve"):
        model_sources(Settings(model_dir=tmp_path / "md"))
    with pytest.raises(ServeError, match="no models to serve"):
        model_sources(Settings(model_control_mode="explicit"))  # nowhere to load a model from
    assert model_sources(Settings(model_dir=tmp_path / "md", model_control_mode="explicit")) == []
    assert "no models to serve yet" in caplog.text


def _remedy(caplog: pytest.LogCaptureFixture) -> str:
    """The `not_ready` advice of the one `model unavailable` line logged."""
    (record,) = [r for r in caplog.records if r.getMessage() == "model unavailable"]
    return record.not_ready


def test_an_unavailable_model_keeps_the_server_not_ready_and_the_log_says_how_to_end_it(fake, repo, caplog):  # noqa: F811
    """hFB 1: in the none mode an unload is refused, so a model whose runtime is not installed keeps a strict server
    not ready for its whole life (a rollout stalls rather than take traffic): the warning names every way out."""
    add_version(repo, "missing", "1", runtime="absent")
    with client(_settings(repo)) as c:
        assert c.get("/v2/health/ready").status_code == 400
        assert c.post("/v2/repository/models/missing/unload").status_code == 503
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the others serve
    said = _remedy(caplog)
    # A pod configured by VITC_* variables is told the variables too (hFD 4).
    for remedy in ("fix or remove the model and restart", "not watched", "--model-control-mode explicit",
                   "VITC_MODEL_CONTROL_MODE=explicit", "POST /v2/repository/models/missing/unload",
                   "--no-strict-readiness (VITC_STRICT_READINESS=false)"):
        assert remedy in said, said
    caplog.clear()
    with client(_settings(repo, model_control_mode="explicit")) as c:
        assert "POST /v2/repository/models/missing/unload" in _remedy(caplog)
        assert c.post("/v2/repository/models/missing/unload").status_code == 200
        assert c.get("/v2/health/ready").json() == {"ready": True}
    caplog.clear()
    with client(_settings(repo, strict_readiness=False)) as c:
        assert not hasattr(next(r for r in caplog.records if r.getMessage() == "model unavailable"), "not_ready")
        assert c.get("/v2/health/ready").json() == {"ready": True}
