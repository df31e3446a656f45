"""models.io.atomic_dir's `before_swap` hook: a last check, under the writer lock, before the new directory replaces
the old one (export.bundle runs its "would this drop a servable artifact" check there)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from models.io import atomic_dir

REPO = Path(__file__).resolve().parents[1]


def _old_target(tmp_path: Path) -> Path:
    target = tmp_path / "b"
    target.mkdir()
    (target / "f").write_text("old")
    return target


def test_before_swap_runs_after_the_body_and_before_the_swap(tmp_path):
    target = _old_target(tmp_path)
    calls = []

    def before_swap() -> None:
        # the body has finished, `target` is still the old directory, and the writer lock is held
        calls.append(((target / "f").read_text(), (tmp / "f").read_text(), (tmp_path / ".b.lock").exists()))

    with atomic_dir(target, before_swap=before_swap) as tmp:
        (tmp / "f").write_text("new")
        assert calls == []
    assert calls == [("old", "new", True)]
    assert (target / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "temporary or lock left behind"


def test_a_refusing_before_swap_keeps_the_old_directory(tmp_path):
    target = _old_target(tmp_path)

    def refuse() -> None:
        raise ValueError("would drop something")

    with pytest.raises(ValueError, match="would drop something"), atomic_dir(target, before_swap=refuse) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "temporary or lock left behind"


def test_a_failing_body_never_calls_before_swap(tmp_path):
    target = _old_target(tmp_path)
    calls = []
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target, before_swap=lambda: calls.append(1)):
        raise RuntimeError("boom")
    assert calls == [] and (target / "f").read_text() == "old"


def test_export_bundle_writes_through_the_public_atomic_dir():
    """export.bundle uses models.io's public API, not its private helpers (no second copy of atomic_dir)."""
    import export.bundle

    tree = ast.parse((REPO / "export" / "bundle.py").read_text())
    private = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "models.io"
               for a in node.names if a.name.startswith("_")]
    assert private == [] and not hasattr(export.bundle, "publish_dir")
