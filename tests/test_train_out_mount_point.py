"""A mount point as `train --out` (a Kubernetes volume under a read-only container root): the run's writer lock lives
inside it, not in the parent, which a container may not write ("cannot use it as the run directory: Read-only file
system" blamed --out for its parent)."""

from __future__ import annotations

import pytest

import train.outdir
from models.io import writer_lock
from train.__main__ import main as train_main
from train.outdir import RUN_LOCK


@pytest.fixture
def locks(monkeypatch) -> list[tuple]:
    """The (target, lock) of every writer lock the training takes."""
    taken: list[tuple] = []

    def recording(target, lock=None):  # noqa: ANN001, ANN202
        taken.append((target, lock))
        return writer_lock(target, lock)

    monkeypatch.setattr(train.outdir, "writer_lock", recording)
    return taken


def test_a_mount_point_out_is_locked_from_inside(tmp_path, monkeypatch, locks, train_cli, train_tiny, capsys):
    vol = tmp_path / "vol"
    vol.mkdir()
    monkeypatch.setattr(train.outdir, "is_mount_point", lambda path: str(path) == str(vol))
    (vol / RUN_LOCK).write_text("")  # what a killed run leaves: not a file of the user's
    code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(vol)], capsys)
    assert code == 0, err
    assert locks == [(vol, vol / RUN_LOCK)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"]  # nothing beside it
    assert not (vol / RUN_LOCK).exists() and (vol / "checkpoint.json").is_file()


def test_any_other_out_is_locked_beside_it(tmp_path, locks, train_cli, train_tiny, capsys):
    out = tmp_path / "run"
    code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(out)], capsys)
    assert code == 0, err
    assert locks == [(out, None)]
