"""The export parity gate's default sample and its noise: by default the whole val split up to
DEFAULT_PARITY_SAMPLES images, and the accuracy delta printed and recorded with its paired 95 % interval.

On the old default of 512 images one point was 5 images: INT8 artifacts passed the 1-point gate there and were 1.4
and 1.6 points below torch on all 1000 animals val images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import LEGACY, legacy_with_manifest

import export.bundle as export_bundle
from data.datasets import ANIMAL_CLASSES, load_dataset
from export import report
from export.bundle import (
    DEFAULT_PARITY_SAMPLES,
    PARITY_MEMORY_BYTES,
    ExportConfig,
    build_bundle,
    default_parity_samples,
    summary_line,
)
from export.cli import parser
from export.parity import INT8_TOLERANCE, ParityData, gate, measure
from models.bundle import read_manifest
from models.preprocessing import Preprocessing

EXPORT = {"max_batch": 32, "threads": 1, "log": lambda _: None}


def _parity_samples(bundle: Path) -> int:
    """The images the bundle's torch artifact was gated on."""
    (artifact,) = read_manifest(bundle).artifacts
    return artifact.parity.val_samples


@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory, micro_checkpoint) -> Path:
    """A torch bundle of the micro checkpoint exported with the default parity sample count (animals val)."""
    root = tmp_path_factory.mktemp("default")
    build_bundle(micro_checkpoint(root), root / "b", ["torch"], **EXPORT)
    return root / "b"


def test_the_default_is_a_named_cap_and_the_help_states_it():
    assert DEFAULT_PARITY_SAMPLES == 5000 and ExportConfig("c", "o").parity_samples is None
    help_text = " ".join(parser().format_help().split())
    assert (f"[the whole val split, up to {DEFAULT_PARITY_SAMPLES} images and 1 GiB of preprocessed pixels: 1783 at "
            "3x224x224]") in help_text, help_text


def test_the_default_holds_at_most_a_gib_of_preprocessed_pixels():
    """5000 images at 3x224x224 were 3 GB of float32 (6 GB at the peak): the default stops at 1 GiB."""
    assert PARITY_MEMORY_BYTES == 1 << 30
    assert default_parity_samples(Preprocessing(resize=256, crop=224)) == 1783  # 1783 x 602,112 bytes <= 1 GiB
    assert default_parity_samples(Preprocessing(resize=36, crop=32)) == DEFAULT_PARITY_SAMPLES


def test_the_default_parity_set_is_the_whole_val_split_below_the_cap(default_bundle):
    """animals val holds 1000 images, under the cap: all of them are measured (512 were, before)."""
    assert len(load_dataset("animals", "val")) == 1000 < DEFAULT_PARITY_SAMPLES
    assert _parity_samples(default_bundle) == 1000


def _val_folder(root: Path, images: int) -> Path:
    for i in range(images):
        folder = root / "data" / "val" / ANIMAL_CLASSES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), i % 251).save(folder / f"{i}.png")
    return root / "data"


def test_the_default_parity_set_is_the_cap_above_it(tmp_path, micro_checkpoint, monkeypatch):
    """A val split larger than the cap: the cap's count of images is drawn, not the split."""
    monkeypatch.setattr(export_bundle, "DEFAULT_PARITY_SAMPLES", 50)  # the rule, on a split of a few dozen images
    data = _val_folder(tmp_path, 53)
    build_bundle(micro_checkpoint(tmp_path), tmp_path / "b", ["torch"], dataset=data, **EXPORT)
    assert _parity_samples(tmp_path / "b") == 50


def test_the_default_parity_set_stops_at_its_memory_bound(tmp_path, micro_checkpoint, monkeypatch):
    """The memory bound draws fewer images than the count cap where the pixels would pass it."""
    monkeypatch.setattr(export_bundle, "PARITY_MEMORY_BYTES", 20 * 4 * 3 * 32 * 32)  # 20 micro images
    data = _val_folder(tmp_path, 25)
    ckpt = micro_checkpoint(tmp_path)
    build_bundle(ckpt, tmp_path / "b", ["torch"], dataset=data, **EXPORT)
    assert _parity_samples(tmp_path / "b") == 20
    build_bundle(ckpt, tmp_path / "asked", ["torch"], dataset=data, parity_samples=25, **EXPORT)  # as asked
    assert _parity_samples(tmp_path / "asked") == 25


def test_parity_samples_still_draws_that_many(tmp_path, micro_checkpoint):
    ckpt = micro_checkpoint(tmp_path)
    build_bundle(ckpt, tmp_path / "few", ["torch"], parity_samples=64, **EXPORT)
    build_bundle(ckpt, tmp_path / "all", ["torch"], parity_samples=10**6, **EXPORT)
    assert (_parity_samples(tmp_path / "few"), _parity_samples(tmp_path / "all")) == (64, 1000)


def _hand_made(artifact_right: list[bool], torch_right: list[bool]) -> tuple[ParityData, np.ndarray]:
    """Parity data whose every label is class 0, torch right where `torch_right` says, and the logits of an
    artifact right where `artifact_right` says (row i of x holds i, so a runner finds its row in any batch)."""
    n = len(torch_right)
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 3, 2, 2)).copy()
    spread = np.linspace(0.1, 0.9, n, dtype=np.float32)  # logits differ by image: a reference that certifies

    def logits(right: list[bool]) -> np.ndarray:
        return np.stack([np.where(right, 2.0 + spread, -spread), np.where(right, -spread, 2.0 + spread)], 1)

    data = ParityData(x, np.zeros(n, np.int64), logits(torch_right).astype(np.float32), dataset="hand-made")
    return data, logits(artifact_right).astype(np.float32)


def _measured(artifact_right: list[bool], torch_right: list[bool]):
    data, table = _hand_made(artifact_right, torch_right)
    return measure(lambda batch: table[batch[:, 0, 0, 0].astype(np.int64)], data, "int8", 4)


def test_the_paired_interval_of_a_hand_made_case():
    """b = 3 images only the artifact gets right, c = 1 only torch does, n = 10: delta (b - c) / n = +0.2 and
    half-width 1.96 * sqrt(b + c - (b - c)^2 / n) / n = 1.96 * sqrt(3.6) / 10."""
    artifact = [True] * 3 + [False] + [True] * 6
    torch = [False] * 3 + [True] + [True] * 6
    p = _measured(artifact, torch)
    assert p.val_samples == 10 and p.accuracy_delta == pytest.approx(0.2)
    assert p.accuracy_delta_ci95 == pytest.approx(1.96 * math.sqrt(3.6) / 10)
    assert p.delta_text(" pt") == "+20.00 pt ±37.19 (95% CI) on 10 images"
    assert p.to_dict()["accuracy_delta_ci95"] == p.accuracy_delta_ci95


def test_the_interval_is_symmetric_in_its_sign_and_zero_without_discordant_pairs():
    worse = _measured([False] * 3 + [True] + [True] * 6, [True] * 3 + [False] + [True] * 6)
    assert worse.accuracy_delta == pytest.approx(-0.2)
    assert worse.accuracy_delta_ci95 == pytest.approx(1.96 * math.sqrt(3.6) / 10)
    same = _measured([True] * 7 + [False] * 3, [True] * 7 + [False] * 3)
    assert (same.accuracy_delta, same.accuracy_delta_ci95) == (0.0, 0.0)


def test_the_gate_does_not_depend_on_the_interval():
    """The verdict is the point estimate's, as before: 1 point within, over 100 images, despite a wide interval."""
    artifact = [True] * 5 + [False] * 6 + [True] * 89
    torch = [False] * 5 + [True] * 6 + [True] * 89
    p = _measured(artifact, torch)
    assert p.accuracy_delta == pytest.approx(-0.01) and p.accuracy_delta_ci95 > 0.04
    drop = [f for f in gate(p, INT8_TOLERANCE) if "below torch" in f]
    assert drop == []


def test_the_gate_line_and_the_report_give_the_interval(default_bundle):
    manifest = read_manifest(default_bundle)
    (artifact,) = manifest.artifacts
    p = artifact.parity
    assert p.accuracy_delta_ci95 is not None and p.accuracy_delta_ci95 >= 0
    said = f"{p.accuracy_delta * 100:+.2f} ±{p.accuracy_delta_ci95 * 100:.2f} (95% CI) on 1000 images"
    assert said == p.delta_text()
    assert f"{p.accuracy_delta * 100:+.2f} pt ±" in summary_line(artifact), summary_line(artifact)
    assert report.rows(manifest)[0][report.COLUMNS.index("Δacc pt")] == said
    raw = json.loads((default_bundle / "manifest.json").read_text())
    assert raw["artifacts"][0]["parity"]["accuracy_delta_ci95"] == p.accuracy_delta_ci95


def test_a_manifest_without_the_interval_loads_validates_and_reports(capsys):
    """tests/data/legacy-bundle-v1 was written long before the interval: it reads, and its record, whose digest a
    golden file may hold, is written back without the field (not as null)."""
    raw = json.loads((LEGACY / "manifest.json").read_text())
    assert all("accuracy_delta_ci95" not in a["parity"] for a in raw["artifacts"] if a.get("parity"))
    manifest = read_manifest(LEGACY)
    parities = [a.parity for a in manifest.artifacts if a.parity]
    assert parities and all(p.accuracy_delta_ci95 is None for p in parities)
    assert all("accuracy_delta_ci95" not in p.to_dict() for p in parities)
    assert report.integrity(LEGACY, manifest) == {}
    cells = [row[report.COLUMNS.index("Δacc pt")] for row in report.rows(manifest)]
    assert cells == ["+0.00 on 32 images"] * len(cells), cells
    assert report.main([str(LEGACY)]) == 0
    assert "+0.00 on 32 images" in capsys.readouterr().out


def test_a_null_interval_reads_and_a_wrong_one_is_refused(tmp_path):
    raw = json.loads((LEGACY / "manifest.json").read_text())
    parity = next(a["parity"] for a in raw["artifacts"] if a.get("parity"))
    parity["accuracy_delta_ci95"] = None
    assert all(a.parity.accuracy_delta_ci95 is None
               for a in read_manifest(legacy_with_manifest(tmp_path, raw)).artifacts if a.parity)
    parity["accuracy_delta_ci95"] = -0.1
    with pytest.raises(ValueError, match="accuracy_delta_ci95"):
        read_manifest(legacy_with_manifest(tmp_path, raw))
