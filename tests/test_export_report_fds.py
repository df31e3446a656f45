"""export.report's title (hDV-5): a bundle name or tag holding a Unicode format character (U+202E RIGHT-TO-LEFT
OVERRIDE, a zero-width character) is refused where the manifest is read, as control characters are, and the title
line escapes the manifest's free text as the rest of the report does."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from export import report
from models.bundle import BundleError, read_manifest

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy-bundle-v1"  # a real bundle, read without any runtime
FORMAT_CHARACTERS = ["\u202e", "\u2066", "\u200b", "\u200f", "\ufeff"]  # RLO, LRI, zero width space, RLM, BOM


def _bundle(tmp_path: Path, edit: dict) -> Path:
    """The legacy bundle copied, with its manifest's top-level fields (and first artifact's, under "artifact")
    edited."""
    bundle = Path(shutil.copytree(LEGACY, tmp_path / "bundle"))
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["artifacts"][0].update(edit.pop("artifact", {}))
    doc.update(edit)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    return bundle


@pytest.mark.parametrize("char", FORMAT_CHARACTERS)
def test_a_bundle_name_with_a_format_character_is_refused_naming_the_field(tmp_path, capsys, char):
    """export.report printed the name raw: the bytes e2 80 ae reached the terminal and reversed the title line."""
    bundle = _bundle(tmp_path, {"name": f"b{char}x"})
    with pytest.raises(BundleError, match="'name'"):
        read_manifest(bundle)
    assert report.main([str(bundle)]) == 2
    captured = capsys.readouterr()
    assert char not in captured.out + captured.err and "'name'" in captured.err, captured


@pytest.mark.parametrize("field", ["runtime", "precision", "format"])
def test_an_artifact_tag_with_a_format_character_is_refused_naming_the_field(tmp_path, field):
    bundle = _bundle(tmp_path, {"artifact": {field: "onnx\u202eruntime"}})
    with pytest.raises(BundleError, match=rf"'artifacts\[0\]\.{field}'"):
        read_manifest(bundle)


def test_names_of_other_scripts_are_still_read(tmp_path):
    bundle = _bundle(tmp_path, {"name": "модель-é 猫"})
    assert read_manifest(bundle).name == "модель-é 猫"


def test_the_title_line_escapes_the_manifests_free_text():
    """The provenance line and the table were escaped; the title line (name, parity dataset) was not."""
    manifest = read_manifest(LEGACY)
    text = report.table(replace(manifest, name="b\u202ex\u200b"))
    title = text.splitlines()[0]
    assert title.startswith("b\\u202ex\\u200b: vit_c_micro"), title
    assert "\u202e" not in text and "\u200b" not in text
