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
