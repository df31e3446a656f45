"""A directory whose parent cannot be searched (Python 3.11's Path.is_dir/is_file raise EACCES there): one line
naming the path and the reason, not a PermissionError traceback. Faked in-process (the tests run as root, which
ignores permission bits)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from PIL import Image

from serve.errors import ServeError
from serve.registry import model_sources
from serve.settings import Settings


def _closed(monkeypatch, closed: Path) -> None:
    """Path.is_dir and is_file raise EACCES for anything under `closed`, as for a parent with mode 644."""
    for name in ("is_dir", "is_file"):
        real = getattr(Path, name)

        def probe(self: Path, _real=real) -> bool:
            if self == closed or closed in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return _real(self)

        monkeypatch.setattr(Path, name, probe)


@pytest.mark.parametrize("flag", ["model_repository", "model_dir"])
def test_a_repository_under_a_closed_parent_is_one_line(tmp_path, monkeypatch, flag):
    root = tmp_path / "closed" / "repo"
    root.mkdir(parents=True)
    settings = Settings(**{flag: root})
    _closed(monkeypatch, tmp_path / "closed")
    with pytest.raises(ServeError) as info:
        model_sources(settings)
    assert str(info.value) == f"--{flag.replace('_', '-')} {root}: Permission denied"


def test_serve_tensor_under_a_closed_parent_says_why(tmp_path, monkeypatch):
    from serve.tensor import TensorError, build

    bundle = tmp_path / "closed" / "b"
    bundle.mkdir(parents=True)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "red").save(image)
    _closed(monkeypatch, tmp_path / "closed")
    with pytest.raises(TensorError) as info:
        build(str(bundle), [str(image)], str(tmp_path / "q.npy"))
    assert str(info.value).startswith("--bundle: ") and "Permission denied" in str(info.value)


def test_export_under_a_closed_parent_is_refused_before_the_work(tmp_path, monkeypatch):
    from export.bundle import _check_out
    from runtimes import ExportError

    out = tmp_path / "closed" / "new"
    out.parent.mkdir()
    _closed(monkeypatch, tmp_path / "closed")
    monkeypatch.setattr(Path, "exists", lambda self: Path.is_dir(self))  # raises there, as is_dir does
    with pytest.raises(ExportError, match=r"^cannot write bundle .*/closed/new: Permission denied$"):
        _check_out(out, None)


def test_export_into_a_parent_that_cannot_be_listed_is_refused_before_the_work(tmp_path, monkeypatch):
    """Mode 311: a file can be made there, but the swap lists the parent for an earlier export's leftovers."""
    import os

    from export.bundle import _check_out
    from runtimes import ExportError

    out = tmp_path / "nolist" / "new"
    out.parent.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out.parent and mode & os.R_OK
                        else real(p, mode, **kw))
    with pytest.raises(ExportError, match=r"nolist cannot be listed \(no read permission\)$"):
        _check_out(out, None)
