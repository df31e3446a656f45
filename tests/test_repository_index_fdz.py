"""The repository index describes one moment, agrees with strict readiness, and tells no client where the models lie
(fDZ): a reload's retirement of the old version, after the index's snapshot, does not make the served version look
not ready; a failed version whose directory is removed or re-published stays listed with the reason that holds
readiness down, and says its files changed; a server path that is not valid UTF-8 is named within the model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
import test_repository_lifecycle
from test_repository_lifecycle import CONFIG, NAME, add_version, client, served

from models.bundle import file_entries, read_manifest, write_manifest
from serve.metrics import Metrics
from serve.registry import load_models
from serve.repository import ModelRepository
from serve.routes.v2 import _index_answer
from serve.settings import Settings

TAMPERED = "artifact file 2/fake.npy"


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_runtime.registered():
        yield


repo = test_repository_lifecycle.repo  # the repository of model "fake", version 1, and its config.pbtxt


def _entries(c: httpx.Client, ready_only: bool = False) -> list[dict]:
    r = c.post("/v2/repository/index", json={"ready": ready_only})
    assert r.status_code == 200, r.text
    return r.json()


def _versions(c: httpx.Client, name: str = NAME) -> dict[str, dict]:
    return {e["version"]: e for e in _entries(c) if e["name"] == name}


def _ready(c: httpx.Client) -> int:
    return c.get("/v2/health/ready").status_code


def test_an_index_describes_its_snapshot_even_when_a_reload_retires_the_old_version_before_it_is_built(fake, repo):
    async def run() -> tuple[list[dict], bytes]:
        settings = served(repo)
        repository = ModelRepository(settings, Metrics(), load_models(settings))
        await repository.start()
        try:
            old = repository.models[NAME]
            view = repository.snapshot()  # on the loop, as the route takes it
            await repository.load(NAME)  # a reload: version 1 again, swapped in; the old object is retired
            await asyncio.gather(*list(repository._retiring))  # its batcher closed before the worker builds the index
            assert old.batcher is not None and not old.batcher.ready
            assert repository.models[NAME].batcher.ready  # version 1 served all along
            entries = await asyncio.to_thread(view.index)
            ready_only = await asyncio.to_thread(_index_answer, view, False, True)
            return entries, ready_only.body
        finally:
            await repository.close(5)

    entries, ready_only = asyncio.run(run())
    assert [e for e in entries if e["name"] == NAME] == [{"name": NAME, "version": "1", "state": "READY"}]
    assert json.loads(ready_only) == [{"name": NAME, "version": "1", "state": "READY"}]


def test_a_model_reloaded_again_and_again_is_ready_in_every_index_answer(fake, repo):
    seen: list[list[dict]] = []
    with client(served(repo)) as c:
        # Many directories listed before the model's own (empty versions, added after the start, which would refuse
        # them): a walk long enough for reloads to land inside it.
        for i in range(400):
            (repo / f"a{i:04d}" / "1").mkdir(parents=True)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                seen.append([e for e in _entries(c) if e["name"] == NAME])
                seen.append([e for e in _entries(c, ready_only=True) if e["name"] == NAME])

        pollers = [threading.Thread(target=poll) for _ in range(3)]
        for t in pollers:
            t.start()
        try:
            for _ in range(40):
                assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
                assert c.get(f"/v2/models/{NAME}/ready").status_code == 200
        finally:
            done.set()
            for t in pollers:
                t.join()
    not_ready = [e for e in seen if e != [{"name": NAME, "version": "1", "state": "READY"}]]
    assert seen and not not_ready, f"{len(not_ready)} of {len(seen)}: {not_ready[:3]}"


def _tamper(version_dir: Path) -> None:
    np.save(version_dir / fake_runtime.WEIGHTS, np.zeros((4, 10), np.float32))


def _republish(repo: Path, version: str) -> None:
    """A good version `version` with other weights than version 1's (what a new export publishes)."""
    dest = add_version(repo, NAME, version)
    np.save(dest / fake_runtime.WEIGHTS, fake_runtime.weights(3, 10, seed=7))
    m = read_manifest(dest)
    artifact = dataclasses.replace(m.artifacts[0], files=file_entries(dest, [dest / fake_runtime.WEIGHTS]))
    write_manifest(dest, dataclasses.replace(m, artifacts=(artifact,)))


def _failed_on_version_2(c: httpx.Client, repo: Path) -> None:
    """The model unloaded, then a load that fails on its tampered newest version 2: strict readiness is down."""
    add_version(repo, NAME, "2")
    _tamper(repo / NAME / "2")
    assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
    r = c.post(f"/v2/repository/models/{NAME}/load")
    assert r.status_code == 400 and TAMPERED in r.json()["error"], r.text
    assert _ready(c) == 400 and TAMPERED in _versions(c)["2"]["reason"]


def test_a_failed_version_whose_directory_is_removed_stays_listed_with_the_reason_readiness_is_down(fake, repo):
    with client(served(repo)) as c:
        _failed_on_version_2(c, repo)
        shutil.rmtree(repo / NAME / "2")  # the operator removes the bad version
        assert _ready(c) == 400  # the last load failed: still not ready, as Triton
        entry = _versions(c).get("2")
        assert entry is not None, _entries(c)  # ... and the index says why
        assert entry["state"] == "UNAVAILABLE" and TAMPERED in entry["reason"], entry
        assert entry["reason"].endswith("(its files were removed since)"), entry
        assert _versions(c)["1"] == {"name": NAME, "version": "1", "state": "UNAVAILABLE", "reason": "not loaded"}
        assert TAMPERED in c.get(f"/v2/models/{NAME}").json()["error"]  # the model's 404 says the same
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200  # given up on: no longer failed
        assert set(_versions(c)) == {"1"} and _versions(c)["1"]["reason"] == "unloaded"
        assert _ready(c) == 400  # ... but the server serves no model at all: not ready either
        # A served model's failed reload, whose version is then removed, is listed until a load succeeds.
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert _ready(c) == 200
        add_version(repo, NAME, "2")
        _tamper(repo / NAME / "2")
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 400
        shutil.rmtree(repo / NAME / "2")
        assert _ready(c) == 200 and _versions(c)["1"]["state"] == "READY"
        assert TAMPERED in _versions(c)["2"]["reason"]
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200  # the latest news of every version
        assert _versions(c) == {"1": {"name": NAME, "version": "1", "state": "READY"}}


def test_a_good_version_published_again_under_a_failed_number_is_not_said_to_be_tampered(fake, repo):
    with client(served(repo)) as c:
        _failed_on_version_2(c, repo)
        shutil.rmtree(repo / NAME / "2")
        _republish(repo, "2")  # good files under the same number, not loaded yet
        assert _ready(c) == 400  # the last load failed all the same
        reason = _versions(c)["2"]["reason"]
        assert TAMPERED in reason and "changed since" in reason, reason  # the last load's reason, said to be stale
        assert not reason.startswith(f"model {NAME!r}: {TAMPERED}"), reason
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert _ready(c) == 200 and _versions(c)["2"] == {"name": NAME, "version": "2", "state": "READY"}
        assert "reason" not in _versions(c)["1"] or TAMPERED not in _versions(c)["1"]["reason"]


def test_a_failure_on_files_untouched_since_keeps_its_reason_as_it_was(fake, repo):
    with client(served(repo)) as c:
        _failed_on_version_2(c, repo)
        reason = _versions(c)["2"]["reason"]
        assert reason.startswith(f"model {NAME!r}: {TAMPERED}") and "since" not in reason, reason
        assert _versions(c)["2"]["reason"] == reason  # asked again: the same files, the same reason
        # Written over in place (other bytes, of another length: a file system's timestamps may not tell a write
        # within their resolution apart): its files changed since the failure.
        np.save(repo / NAME / "2" / fake_runtime.WEIGHTS, np.zeros((5, 10), np.float32))
        reason = _versions(c)["2"]["reason"]
        assert TAMPERED in reason and "changed since" in reason, reason
        assert _ready(c) == 400  # the last load failed all the same


def _answered_within(seconds: float, call, fifo: Path):  # noqa: ANN001, ANN202
    """`call()`'s result, failing the test when it does not return within `seconds`; a reader blocked on `fifo` is
    then let go (a writer opens it), so that the server can still shut down and the test fails instead of hanging."""
    box: list = []
    worker = threading.Thread(target=lambda: box.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    if not box:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(seconds)
        pytest.fail(f"no answer within {seconds} s while {fifo.name} was a FIFO")
    return box[0]


def test_a_fifo_for_a_failed_versions_manifest_never_blocks_the_server(fake, repo):
    """hEE: the failure's fingerprint opened manifest.json as it was, so a FIFO there froze the event loop (the load
    never answered, liveness neither) or, put there after the failure, held every index request's worker for good."""
    with client(served(repo)) as c:
        version = repo / NAME / "2"
        version.mkdir()
        os.mkfifo(version / "manifest.json")
        r = _answered_within(60, lambda: c.post(f"/v2/repository/models/{NAME}/load"), version / "manifest.json")
        assert r.status_code == 400, r.text
        shutil.rmtree(version)
        _failed_on_version_2(c, repo)
        (repo / NAME / "2" / "manifest.json").unlink()
        os.mkfifo(repo / NAME / "2" / "manifest.json")
        fifo = repo / NAME / "2" / "manifest.json"
        entry = _answered_within(60, lambda: _versions(c)["2"], fifo)
        assert entry["state"] == "UNAVAILABLE" and "changed since" in entry["reason"], entry
        assert _answered_within(60, lambda: c.get("/v2/health/live"), fifo).status_code == 200


def test_a_failed_versions_fingerprint_lists_a_bounded_number_of_entries(tmp_path):
    """os.walk listed each directory whole (0.1 s for 100,000 files, on the event loop of a failed load)."""
    from serve.repository import MAX_FINGERPRINTED, _first_entries

    big = tmp_path / "v"
    (big / "sub").mkdir(parents=True)
    for i in range(MAX_FINGERPRINTED + 50):
        (big / f"f{i}").touch()
        (big / "sub" / f"g{i}").touch()
    found = _first_entries(big, MAX_FINGERPRINTED)
    assert len(found) == MAX_FINGERPRINTED and len(set(found)) == MAX_FINGERPRINTED
    assert all(p.startswith(str(big) + os.sep) for p in found)
    assert _first_entries(tmp_path / "missing", 10) == []


def test_a_server_path_that_is_not_utf8_is_named_within_the_model_directory(tmp_path):
    """onnxruntime spells such a path with backslash escapes (runtimes/onnxruntime.py: session_source)."""
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/secret\xffdir/models"))
    shutil.copytree(fake_runtime.LEGACY, root / "good")
    staged = root.parent / "staged"
    shutil.copytree(fake_runtime.LEGACY, staged)
    (staged / "model.onnx.data").write_bytes(b"")  # weights outside the file: onnxruntime must open it by its path
    settings = Settings(model_control_mode="explicit",
                        model_dir=root, backend="onnxruntime", access_log=False, graceful_timeout_s=5, threads=1,
                        parallel=1)
    with client(settings) as c:
        staged.rename(root / "ext")  # added after the start, then loaded
        r = c.post("/v2/repository/models/ext/load")
        assert r.status_code == 400 and "not valid UTF-8" in r.text, r.text
        entries = _entries(c)
    says = "model 'ext': model.onnx: the path is not valid UTF-8, which onnxruntime cannot open"
    assert r.json()["error"].startswith(says), r.text
    ext = [e for e in entries if e["name"] == "ext"]
    assert len(ext) == 1 and ext[0]["reason"].startswith(says), entries
    assert "secret" not in r.text + json.dumps(entries) and str(tmp_path) not in r.text + json.dumps(entries)


def test_the_latest_failure_is_the_one_said_and_a_fixed_config_is_not_blamed(fake, repo):
    """hEE: a failure recorded again kept its old place (the model's 404 gave an older one), and a config.pbtxt
    failure stayed the reason of every version after a later load got past the fixed config."""
    config = repo / NAME / "config.pbtxt"
    broken = CONFIG.replace("max_batch_size: 8", "max_batch_size: 8\nbogus: 1")
    assert broken != CONFIG
    with client(served(repo)) as c:
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        config.write_text(broken)
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 400
        config.write_text(CONFIG)  # fixed; the load now fails on a tampered version 2
        add_version(repo, NAME, "2")
        _tamper(repo / NAME / "2")
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 400
        assert _versions(c)["1"]["reason"] == "not loaded", _versions(c)
        assert TAMPERED in c.get(f"/v2/models/{NAME}").json()["error"]
        config.write_text(broken)  # broken again: the latest failure is the config's
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 400
        said = c.get(f"/v2/models/{NAME}").json()["error"]
        assert "bogus" in said and TAMPERED not in said, said
