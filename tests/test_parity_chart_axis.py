"""`python -m export.report --png`: every panel's accuracy axis starts at 0 and spans the same range, so half a point
does not look large and a 61 % bundle does not look like a 37.5 % one."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.figure

from export.report import plot


def _manifest(name: str, accuracies: list[float]) -> SimpleNamespace:
    arts = [SimpleNamespace(id=f"a{i}", servable=True, parity=SimpleNamespace(accuracy=a, reference_accuracy=0.61))
            for i, a in enumerate(accuracies)]
    return SimpleNamespace(name=name, artifacts=arts)


def test_every_panel_starts_at_zero_on_the_same_range(tmp_path, monkeypatch):
    drawn: list[list[tuple[float, float]]] = []
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):  # noqa: ANN001, ANN202
        drawn.append([ax.get_ylim() for ax in fig.axes])
        labels = [t.get_text() for ax in fig.axes for t in ax.texts]
        drawn.append(labels)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    path = plot([_manifest("c", [0.610, 0.615]), _manifest("p", [0.375, 0.375])], tmp_path / "parity.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    limits, labels = drawn
    assert limits[0][0] == 0 and len(set(limits)) == 1 and limits[0][1] >= 100
    assert labels == ["61.0", "61.5", "37.5", "37.5"]  # each bar carries its value
