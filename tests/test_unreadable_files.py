"""A bundle file or directory that cannot be read (no permission, a symbolic link loop) is one clear reason naming it:
the repository load API answers 400 while the version loaded before serves on, `python -m serve` exits 2 with one
line, `python -m export.report` marks the artifact CORRUPT and exits 2; never a 500 or a traceback.

Tests run as root in CI, where chmod 000 stops nothing: `deny` makes the operating system's answers for a path what
they are for a process without the permission (EACCES from open, and for a directory from listing it and from
looking at anything inside it). One test checks the real thing where it can drop that privilege."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest

from models.bundle import Artifact, Golden, file_entries, read_manifest, write_manifest
from serve.errors import ServeError
from serve.registry import load_models
from serve.settings import Settings

SERVE_ERROR = "python -m serve: error: "
REPORT_ERROR = "python -m export.report: error: "

ROOT = Path(__file__).resolve().parents[1]
NAME = "fake"
DENIED = "cannot read it: Permission denied"


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_runtime.registered():
        yield


@pytest.fixture
def deny(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """`deny(path)`: the file or directory behaves as mode 000 does for a process that is not root."""
    denied: list[str] = []

    def refused(path: object, itself: bool) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):
            return False  # a file descriptor
        p = os.path.abspath(os.fsdecode(path))
        return any((itself and p == d) or p.startswith(d + os.sep) for d in denied)

    def guard(real: Callable, itself: bool) -> Callable:
        def call(path: object = ".", *args: object, **kwargs: object) -> object:
            if refused(path, itself):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    # Opening or listing the path itself fails; so does looking at anything inside a denied directory (stat, lstat).
    for module, name, itself in [(builtins, "open", True), (io, "open", True), (os, "listdir", True),
                                 (os, "scandir", True), (os, "stat", False), (os, "lstat", False)]:
        monkeypatch.setattr(module, name, guard(getattr(module, name), itself))
    return lambda path: denied.append(os.path.abspath(path))


def fake_bundle(dest: Path, golden: bool = False) -> Path:
    """A bundle of the fake runtime's artifact alone (what export.triton writes for a real one), with a golden file
    listed in its manifest when asked (its content is never reached: it cannot be read)."""
    m = read_manifest(fake_runtime.LEGACY)
    dest.mkdir(parents=True)
    np.save(dest / fake_runtime.WEIGHTS, fake_runtime.weights(m.input.channels, m.output.classes))
    artifact = Artifact(id="fake-fp32", runtime="fake", format="npy", precision="fp32", servable=True,
                        files=file_entries(dest, [dest / fake_runtime.WEIGHTS]))
    m = dataclasses.replace(m, artifacts=(artifact,))
    if golden:
        (dest / "golden.npz").write_bytes(b"PK\x05\x06" + bytes(18))
        m = dataclasses.replace(m, golden=Golden(file_entries(dest, [dest / "golden.npz"])[0], 8))
    write_manifest(dest, m)
    return dest


def spoil(version: Path, what: str, deny: Callable[[Path], None]) -> str:
    """Make one part of a bundle unreadable; what the reason must say."""
    if what == "artifact file":
        deny(version / fake_runtime.WEIGHTS)
        return f"artifact file {version / fake_runtime.WEIGHTS}: {DENIED}"
    if what == "golden file":
        deny(version / "golden.npz")
        return f"golden inputs {version / 'golden.npz'}: {DENIED}"
    if what == "version directory":
        deny(version)
        return f"version directory {version}: {DENIED}"
    assert what == "symlink loop"  # real on any file system, root or not
    (version / fake_runtime.WEIGHTS).unlink()
    (version / fake_runtime.WEIGHTS).symlink_to(fake_runtime.WEIGHTS)
    return f"artifact file {version / fake_runtime.WEIGHTS}: cannot read it: {os.strerror(errno.ELOOP)}"


@contextlib.contextmanager
def client(settings: Settings) -> Iterator[httpx.Client]:
    from fastapi.testclient import TestClient

    from serve.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


WHAT = ["artifact file", "golden file", "version directory", "symlink loop"]


@pytest.mark.parametrize("what", WHAT)
def test_a_load_answers_400_with_the_reason_and_the_old_version_serves_on(fake, deny, tmp_path, what):
    repo = tmp_path / "repo"
    fake_bundle(repo / NAME / "1")
    with client(Settings(model_control_mode="explicit",
                         model_repository=repo, access_log=False, graceful_timeout_s=5)) as c:
        says = spoil(fake_bundle(repo / NAME / "2", golden=what == "golden file"), what, deny)
        r = c.post(f"/v2/repository/models/{NAME}/load")
        says = says.replace(f"{repo / NAME}/", "")  # named within the model directory, never the server's paths
        assert r.status_code == 400 and r.json()["error"] == f"model '{NAME}': {says}", r.text
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]
        index = {(e["name"], e["version"]): e for e in c.post("/v2/repository/index").json()}
        assert index[(NAME, "1")]["state"] == "READY"
        assert index[(NAME, "2")]["state"] == "UNAVAILABLE" and says in index[(NAME, "2")]["reason"]


def test_the_index_says_why_an_unreadable_version_directory_is_not_served(fake, deny, tmp_path):
    repo = tmp_path / "repo"
    fake_bundle(repo / NAME / "1")
    (repo / NAME / "config.pbtxt").write_text("max_batch_size: 8\nversion_policy: { specific: { versions: [ 1 ] } }\n"
                                              'input [{ name: "input" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }]\n'
                                              'output [{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }]\n')
    with client(Settings(model_control_mode="explicit",
                         model_repository=repo, access_log=False, graceful_timeout_s=5)) as c:
        says = spoil(fake_bundle(repo / NAME / "2"), "version directory", deny).replace(f"{repo / NAME}/", "")
        index = {(e["name"], e["version"]): e for e in c.post("/v2/repository/index").json()}
        assert index[(NAME, "1")]["state"] == "READY"
        assert index[(NAME, "2")] == {"name": NAME, "version": "2", "state": "UNAVAILABLE", "reason": says}


@pytest.mark.parametrize("what", WHAT)
def test_the_server_does_not_start_and_says_why_in_one_line(fake, deny, tmp_path, capsys, what):
    from serve.__main__ import main

    repo = tmp_path / "repo"
    says = spoil(fake_bundle(repo / NAME / "1", golden=what == "golden file"), what, deny)
    assert main(["--model-repository", str(repo)]) == 2
    assert capsys.readouterr().err == f"{SERVE_ERROR}model '{NAME}={repo / NAME}': {says}\n"
    if what != "version directory":  # the same bundle served directly
        with pytest.raises(ServeError) as refused:
            load_models(Settings(models=[str(repo / NAME / "1")], backend="fake"))
        assert str(refused.value) == f"model '{repo / NAME / '1'}': {says}"


@pytest.mark.parametrize("denied, says", [
    ("model directory", "model directory {repo}/fake: " + DENIED),
    ("repository", "--model-repository {repo}: " + DENIED),
    ("bundle directory", "model '{repo}/fake/1': cannot read {repo}/fake/1/manifest.json: Permission denied"),
])
def test_an_unreadable_directory_above_a_bundle_is_one_line_at_start(fake, deny, tmp_path, denied, says):
    repo = tmp_path / "repo"
    fake_bundle(repo / NAME / "1")
    deny({"model directory": repo / NAME, "repository": repo, "bundle directory": repo / NAME / "1"}[denied])
    settings = Settings(models=[str(repo / NAME / "1")], backend="fake") if denied == "bundle directory" \
        else Settings(model_repository=repo)
    with pytest.raises(ServeError) as refused:
        load_models(settings)
    assert says.format(repo=repo) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("what", ["artifact file", "golden file", "symlink loop"])
def test_the_report_marks_it_corrupt_and_exits_2(deny, tmp_path, capsys, what):
    from export.report import main

    bundle = fake_bundle(tmp_path / "b", golden=what == "golden file")
    says = spoil(bundle, what, deny)
    assert main([str(bundle)]) == 2
    out, err = capsys.readouterr()
    assert f"CORRUPT: {says}" in out
    which = "golden" if what == "golden file" else "fake-fp32"
    assert err == f"{REPORT_ERROR}corrupt, will not load: {bundle}: {which}\n"


def _unprivileged() -> list[str] | None:
    """A command prefix under which mode 000 stops a read (root reads anyway: setpriv drops that privilege), or None."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if shutil.which("setpriv") else None


def test_a_file_of_mode_000_is_one_line_from_the_report(tmp_path):
    """The real thing, without `deny`: a process that lacks the permission."""
    prefix = _unprivileged()
    bundle = fake_bundle(tmp_path / "b")
    weights = bundle / fake_runtime.WEIGHTS
    weights.chmod(0)
    try:
        check = subprocess.run([*prefix, "cat", str(weights)], capture_output=True) if prefix is not None else None
        if check is None or check.returncode == 0:
            pytest.skip("cannot run a process that mode 000 stops here")
        run = subprocess.run([*prefix, sys.executable, "-m", "export.report", str(bundle)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    finally:
        weights.chmod(0o644)
    assert run.returncode == 2, run.stderr
    assert f"CORRUPT: artifact file {weights}: {DENIED}" in run.stdout
    assert run.stderr == f"{REPORT_ERROR}corrupt, will not load: {bundle}: fake-fp32\n"


def test_model_dir_names_what_it_cannot_look_into(fake, deny, tmp_path, caplog):
    """A bundle directory with the wrong owner disappeared from the served set without a word, and an unreadable
    --model-dir said it "holds no bundle"."""
    from serve.registry import model_sources

    exports = tmp_path / "exports"
    fake_bundle(exports / "one")
    fake_bundle(exports / "two")
    deny(exports / "two")
    with caplog.at_level("WARNING", logger="vitc.serve"):
        sources = model_sources(Settings(model_dir=exports))
    assert [s.path.name for s in sources] == ["one"]
    said = [r for r in caplog.records if "cannot be looked into" in r.getMessage()]
    assert said and said[0].directories == ["two: Permission denied"]
    deny(exports)
    with pytest.raises(ServeError, match=f"--model-dir {exports}: {DENIED}"):
        model_sources(Settings(model_dir=exports))
