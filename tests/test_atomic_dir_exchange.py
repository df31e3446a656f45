"""models.io.atomic_dir replaces an existing directory in one step (renameat2 RENAME_EXCHANGE): a reader never finds
the path missing, as it did between the two renames (a server reloading a bundle, Triton polling a repository)."""

from __future__ import annotations

import os
import threading

import pytest

import models.io
from models.io import atomic_dir, exchange


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2 RENAME_EXCHANGE is not available on this kernel or file system")
    assert ((a / "f").read_text(), (b / "f").read_text()) == ("b", "a")
    with pytest.raises(FileNotFoundError):
        exchange(a, tmp_path / "missing")


def test_the_replaced_directory_is_never_missing(tmp_path, monkeypatch):
    target = tmp_path / "b"
    target.mkdir()
    if not exchange(target, target):  # a no-op where it is supported
        pytest.skip("renameat2 RENAME_EXCHANGE is not available on this kernel or file system")
    renames: list[str] = []
    real = os.replace
    monkeypatch.setattr(models.io.os, "replace", lambda a, b: (renames.append(str(b)), real(a, b))[1])
    missing, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not os.path.isdir(target):
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for k in range(50):
            with atomic_dir(target) as tmp:
                (tmp / "f").write_text(str(k))
    finally:
        stop.set()
        watcher.join()
    assert (target / "f").read_text() == "49" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert not [r for r in renames if r == str(target)], "swapped by renames, not in one step"
    assert not missing


def test_without_exchange_the_two_renames_still_replace_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models.io, "exchange", lambda _a, _b: False)  # an old kernel, or a file system without it
    target = tmp_path / "b"
    target.mkdir()
    (target / "f").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
