"""What a client reads of a failed load (the load's 400, the repository index, a model's 404) names files relative
to the model directory, never where the server keeps its models (the log line keeps the full path for operators);
and the repository index is built off the event loop, so a liveness probe is answered while a large repository is
walked."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from test_repository_lifecycle import CONFIG, NAME, add_version, client, served
from test_serve_fixtures import serving_app

from models.bundle import MANIFEST_FILE
from serve.settings import Settings

# A directory name holding every character a regular expression gives a meaning to.
ODD = r"re+po(1)[x]{2}$^.*?|\ q"
LABELLED = CONFIG.replace("dims: [ 10 ] }", 'dims: [ 10 ] label_filename: "labels.txt" }')


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_runtime.registered():
        yield


def _places(root: Path) -> list[str]:
    """Every spelling of where the models lie that an answer must not carry (a relative one: as a path's start)."""
    given = str(root) if root.is_absolute() else f"{root}/"
    return sorted({given, os.path.abspath(root), os.path.realpath(root), repr(given)[1:-1],
                   repr(os.path.realpath(root))[1:-1]}, key=len)


def _tells_no_place(text: str, root: Path) -> None:
    leaked = [p for p in _places(root) if p in text]
    assert not leaked, f"{leaked} in {text!r}"


def _make_root(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the root the server is given, the directory the files really are in): a plain directory, one given relative
    to where the server runs, a symbolic link to one elsewhere, or a directory whose name a regular expression would
    misread."""
    if kind == "plain":
        return tmp_path / "models", tmp_path / "models"
    if kind == "relative":
        monkeypatch.chdir(tmp_path)
        return Path("models"), tmp_path / "models"
    if kind == "odd":
        return tmp_path / ODD / "models", tmp_path / ODD / "models"
    real = tmp_path / "real" / "models"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    return tmp_path / "link" / "models", real


@contextlib.contextmanager
def _load_failures(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The reasons the server logged for failed loads (what an operator reads)."""
    logged: list[str] = []
    with caplog.at_level(logging.WARNING, logger="vitc"):
        yield logged
        logged += [r.reason for r in caplog.records if r.getMessage() == "load failed"]


def _refused(c: httpx.Client, name: str, says: str) -> str:
    r = c.post(f"/v2/repository/models/{name}/load")
    assert r.status_code == 400 and says in r.json()["error"], r.text
    return r.json()["error"]


@pytest.mark.parametrize("kind", ["plain", "relative", "link", "odd"])
def test_a_repository_load_and_index_name_files_within_the_model_directory(fake, tmp_path, caplog, monkeypatch,
                                                                           kind):
    given, real = _make_root(tmp_path, kind, monkeypatch)
    add_version(real, NAME, "1")
    (real / NAME / "config.pbtxt").write_text(CONFIG)
    model = real / NAME
    answers: list[str] = []
    with _load_failures(caplog) as logged, client(served(given)) as c:
        (model / "2").mkdir()  # empty, or still being copied
        answers.append(_refused(c, NAME, "version directory 2 has no manifest.json"))
        index = c.post("/v2/repository/index").json()
        answers += [e["reason"] for e in index if e["state"] != "READY"]
        assert any("version directory 2 has no manifest.json" in e.get("reason", "") for e in index), index
        answers.append(c.get(f"/v2/models/{NAME}/versions/2").text)
        (model / "2").rmdir()
        (model / "config.pbtxt").write_text(CONFIG + "bogus_field: 1\n")
        answers.append(_refused(c, NAME, "config.pbtxt: bogus_field"))
        (model / "config.pbtxt").write_text(LABELLED)
        (model / "labels.txt").write_text("a\nb\n")
        answers.append(_refused(c, NAME, "label_filename 'labels.txt': labels.txt holds 2 lines"))
        (model / "config.pbtxt").write_text(CONFIG)
        np.save(model / "1" / fake_runtime.WEIGHTS, np.zeros((4, 10), np.float32))  # tampered
        answers.append(_refused(c, NAME, "artifact file 1/fake.npy "))
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        answers.append(_refused(c, NAME, "artifact file 1/fake.npy "))
        answers.append(c.get(f"/v2/models/{NAME}/ready").text)  # not served: its 404 says why
        assert "1/fake.npy" in answers[-1]
        answers += [e.get("reason", "") for e in c.post("/v2/repository/index").json()]
    for text in answers:
        _tells_no_place(text, given)
        _tells_no_place(text, real)
    # The operator's log keeps the full path of every failure.
    assert len(logged) == 5 and all(str(model) in why or str(given / NAME) in why for why in logged), logged


def test_a_symlinked_model_or_version_directory_is_named_by_its_name_in_the_repository(fake, tmp_path):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    add_version(elsewhere, NAME, "1")
    (elsewhere / NAME / "config.pbtxt").write_text(CONFIG)
    repo.mkdir()
    (repo / NAME).symlink_to(elsewhere / NAME)  # the model directory is a link
    add_version(elsewhere, "v", "3")
    (repo / "other").mkdir()
    (repo / "other" / "config.pbtxt").write_text(CONFIG.replace('"fake"', '"other"', 1))
    (repo / "other" / "3").symlink_to(elsewhere / "v" / "3")  # a version directory is a link
    with client(served(repo)) as c:
        np.save(elsewhere / NAME / "1" / fake_runtime.WEIGHTS, np.zeros((4, 10), np.float32))
        _tells_no_place(_refused(c, NAME, "artifact file 1/fake.npy "), tmp_path)
        np.save(elsewhere / "v" / "3" / fake_runtime.WEIGHTS, np.zeros((4, 10), np.float32))
        _tells_no_place(_refused(c, "other", "artifact file 3/fake.npy "), tmp_path)


@pytest.mark.parametrize("kind", ["plain", "relative", "link", "odd"])
def test_a_model_dir_load_names_the_file_within_its_bundle(fake, tmp_path, caplog, monkeypatch, kind):
    given, real = _make_root(tmp_path, kind, monkeypatch)
    fake_runtime.write_bundle(real / "a")
    settings = Settings(model_control_mode="explicit",
                        model_dir=given, backend="fake", access_log=False, graceful_timeout_s=5)
    with _load_failures(caplog) as logged, client(settings) as c:
        np.save(real / "a" / fake_runtime.WEIGHTS, np.zeros((4, 10), np.float32))
        answers = [_refused(c, "a", "artifact file fake.npy ")]
        (real / "a" / fake_runtime.WEIGHTS).write_bytes(b"x" * (real / "a" / "model.onnx").stat().st_size)
        fake_runtime.write_bundle(real / "b")
        (real / "b" / MANIFEST_FILE).write_text("{")
        answers.append(_refused(c, "b", f"corrupt manifest {MANIFEST_FILE}"))
        answers += [e.get("reason", "") for e in c.post("/v2/repository/index").json()]
        answers.append(c.get("/v2/models/b/ready").text)
    for text in answers:
        _tells_no_place(text, given)
        _tells_no_place(text, real)
    assert len(logged) == 2 and all(re.search(rf"{re.escape(str(real))}|{re.escape(str(given))}", why)
                                    for why in logged), logged


def test_a_model_given_on_the_command_line_is_named_by_its_directory_alone(fake, tmp_path):
    bundle = fake_runtime.write_bundle(tmp_path / "secret" / "place" / "bundle")
    settings = Settings(model_control_mode="explicit",
                        models=[f"m={bundle}"], backend="fake", access_log=False, graceful_timeout_s=5)
    with client(settings) as c:
        np.save(bundle / fake_runtime.WEIGHTS, np.zeros((4, 10), np.float32))
        text = _refused(c, "m", "artifact file fake.npy ")
        _tells_no_place(text, tmp_path)


def test_a_path_is_replaced_only_whole():
    from serve.repository import _Place, without_places

    root, model = Path("/srv/re+po"), Path("/srv/re+po/m")
    places = [_Place(model / "2", "2", "2/"), _Place(model, "m", ""), _Place(root, "--model-repository", "")]
    for said, meant in [
        ("artifact file /srv/re+po/m/2/model.onnx is 3 bytes", "artifact file 2/model.onnx is 3 bytes"),
        ("/srv/re+po/m/config.pbtxt: bogus", "config.pbtxt: bogus"),
        ("version directory /srv/re+po/m/2 has no manifest.json", "version directory 2 has no manifest.json"),
        ("model directory '/srv/re+po/m' has none.", "model directory 'm' has none."),
        ("cannot read /srv/re+po: denied; /srv/re+po/n/1 too", "cannot read --model-repository: denied; n/1 too"),
        ("/srv/re+po2/m and /srv/re+po/m2 and /x/srv/re+po/m/1", "/srv/re+po2/m and m2 and /x/srv/re+po/m/1"),
        ("/srv/re+po/m.bak and /srv/rexpo/m", "m.bak and /srv/rexpo/m"),  # m.bak: in the repository
    ]:
        assert without_places(said, places) == meant
    word = [_Place(Path("models"), "--model-dir", "")]  # a relative root: a path only when a path follows it
    assert without_places("the models models/a/x.npy", word) == "the models a/x.npy"


def _wide_repository(root: Path, models: int) -> None:
    """A repository of `models` model directories of three empty versions each (nothing to load, much to walk)."""
    for i in range(models):
        for v in ("1", "2", "3"):
            (root / f"m{i:05d}" / v).mkdir(parents=True)


def test_the_repository_index_is_built_off_the_event_loop(fake, tmp_path):
    """A liveness probe sent while the index walks thousands of model directories is answered before the index."""
    from serve.app import create_app
    from serve.http_limits import ConnectionLimits

    repo = tmp_path / "repo"
    add_version(repo, NAME, "1")
    (repo / NAME / "config.pbtxt").write_text(CONFIG)
    app = create_app(served(repo))
    done: list[str] = []
    with serving_app(app, ConnectionLimits(60.0, 100)) as (port, _), httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        _wide_repository(repo, 3000)  # after the start, which would load (and refuse) each
        expected = c.post("/v2/repository/index").json()
        assert len(expected) == 3000 * 3 + 1
        answers: dict[str, httpx.Response] = {}

        def ask(what: str, method: str, path: str) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as own:
                answers[what] = own.request(method, path)
            done.append(what)

        index = threading.Thread(target=ask, args=("index", "POST", "/v2/repository/index"))
        index.start()
        # Until the index is in the work pool (or, built on the loop, already answered).
        while index.is_alive() and not app.state.work_pool.in_flight:
            time.sleep(0.001)
        ask("live", "GET", "/v2/health/live")
        index.join(60)
    assert done == ["live", "index"]
    assert answers["live"].status_code == 200 and answers["index"].json() == expected  # the same answer
