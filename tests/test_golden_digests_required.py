"""Deleting the contract, origin or record arrays from a bundle's golden.npz (its sha256 fixed in the manifest) does
not pass it off as one exported before those records existed: the manifest shows which vitc wrote it (the golden
record's `digests`, the parity intervals), so the report calls it CORRUPT and a server refuses it. Bundles that
predate each array still load."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_serve_fixtures import micro_bundle

import runtimes
from models.bundle import MANIFEST_FILE, BundleError, read_manifest
from models.io import sha256_file

pytestmark = [
    pytest.mark.skipif(not runtimes.get("onnxruntime").installed(), reason="onnxruntime is not installed"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory, ("onnx",))


def _stripped(bundle: Path, dest: Path, drop: Callable[[str], bool], edit: Callable[[dict], None] = lambda _: None
              ) -> Path:
    """A copy of `bundle` whose golden.npz lost the arrays `drop` names, with the manifest's golden entry fixed (and
    `edit` applied to it): what someone who can write the bundle does."""
    shutil.copytree(bundle, dest)
    golden = dest / "golden.npz"
    with np.load(golden, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if not drop(k)}
    np.savez_compressed(golden, **kept)
    raw = json.loads((dest / MANIFEST_FILE).read_text())
    raw["golden"]["file"].update(sha256=sha256_file(golden), bytes=golden.stat().st_size)
    edit(raw)
    (dest / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))
    return dest


def _relabelled(raw: dict) -> None:
    """What the contract would have caught."""
    raw["class_names"].reverse()


def _other_origin(raw: dict) -> None:
    """What the origin would have caught."""
    raw["provenance"]["git_commit"] = "0" * 40


def _better_accuracy(raw: dict) -> None:
    """What the artifact records would have caught."""
    for a in raw["artifacts"]:
        a["parity"]["accuracy"] = 0.99


def _unmarked(raw: dict) -> None:
    """Relabelled, and the manifest's list of digests deleted too: the parity intervals still date the export."""
    _relabelled(raw)
    del raw["golden"]["digests"]


def _as_before_intervals(raw: dict) -> None:
    """No list of digests and no parity intervals: only the golden file's own members date it."""
    del raw["golden"]["digests"]
    for a in raw["artifacts"]:
        (a.get("parity") or {}).pop("accuracy_delta_ci95", None)


def _listing(*digests: str) -> Callable[[dict], None]:
    """The manifest's list of digests cut down to `digests`, and no parity intervals: all that is left to date the
    export is what the list still names."""
    def edit(raw: dict) -> None:
        _as_before_intervals(raw)
        raw["golden"]["digests"] = list(digests)
    return edit


DIGESTS = lambda k: k in ("contract", "origin") or k.startswith("record.")  # noqa: E731


@pytest.mark.parametrize("drop, edit, says", [
    (lambda k: k == "contract", _relabelled, "holds no 'contract' array, yet the manifest's golden record lists"),
    (lambda k: k == "origin", _other_origin, "holds no 'origin' array, yet the manifest's golden record lists"),
    (lambda k: k.startswith("record."), _better_accuracy, "the golden file records no artifact 'onnx-fp32'"),
    (DIGESTS, _relabelled, "holds no 'contract' array"),
    (DIGESTS, _unmarked, "holds no 'contract' array, yet its parity records carry accuracy_delta_ci95"),
    (lambda k: k == "contract", lambda raw: (_as_before_intervals(raw), _relabelled(raw)),
     "holds no 'contract' array, yet it holds the digests or sources"),
    (lambda k: k == "origin", lambda raw: (_as_before_intervals(raw), _other_origin(raw)),
     "holds no 'origin' array, yet it holds artifact records"),
    # The list cut down to a later digest: it still requires every one written before it (record => origin =>
    # contract), and the records it names.
    (lambda k: DIGESTS(k) or k.startswith("source."), lambda raw: (_listing("record")(raw), _relabelled(raw),
                                                                  _better_accuracy(raw)),
     "holds no 'contract' array, yet the manifest's golden record lists 'record'"),
    (lambda k: k == "origin" or k.startswith("record."), lambda raw: (_listing("contract", "record")(raw),
                                                                      _better_accuracy(raw)),
     "holds no 'origin' array, yet the manifest's golden record lists 'record'"),
    (lambda k: k.startswith("record."), lambda raw: (_listing("record")(raw), _better_accuracy(raw)),
     "the golden file records no artifact 'onnx-fp32'"),
    (lambda k: DIGESTS(k) or k.startswith("source."), lambda raw: (_listing("origin")(raw), _relabelled(raw)),
     "holds no 'contract' array, yet the manifest's golden record lists 'origin'"),
], ids=["contract", "origin", "records", "all", "all-and-the-list", "contract-old-manifest", "origin-old-manifest",
        "record-listed-alone", "origin-not-listed", "records-listed-alone", "origin-listed-alone"])
def test_a_deleted_digest_is_corrupt_in_the_report_and_refused_by_a_server(bundle, tmp_path, capsys, drop, edit,
                                                                          says):
    from export import triton
    from export.report import main
    from serve.errors import ServeError
    from serve.registry import load_model
    from serve.settings import Settings

    assert "digests" in json.loads((bundle / MANIFEST_FILE).read_text())["golden"]  # what export writes now
    edited = _stripped(bundle, tmp_path / "b", drop, edit)
    capsys.readouterr()
    assert main([str(edited)]) == 2
    out, err = capsys.readouterr()
    assert "CORRUPT: " in out and says in out, out
    assert err.startswith("python -m export.report: error: corrupt, will not load: ") and err.count("\n") == 1
    with pytest.raises(ServeError, match=says) as info:  # a server's start: one line, exit 2
        load_model(str(edited), Settings(models=[str(edited)], access_log=False))
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError, match=says):
        runtimes.open_backend(edited, read_manifest(edited), "onnxruntime")
    assert triton.main([str(edited), "--out", str(tmp_path / "repo")]) == 2  # Triton would serve it unchecked
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("drop", [
    lambda k: k.startswith(("origin", "record.")),  # 2026-12-05, before the records (contract and sources kept)
    lambda k: k.startswith(("origin", "record.", "source.", "contract")),  # before the contract (outputs kept)
    lambda k: k not in ("pixels", "logits"),  # d0d913b: pixels and logits alone
], ids=["before-records", "before-contract", "first-golden"])
def test_bundles_from_before_each_digest_still_load(bundle, tmp_path, capsys, drop):
    from export.report import main

    old = _stripped(bundle, tmp_path / "old", drop, _as_before_intervals)
    runtimes.open_backend(old, read_manifest(old), "onnxruntime").close()
    capsys.readouterr()
    assert main([str(old)]) == 0
    assert "CORRUPT" not in capsys.readouterr().out


def test_a_digest_this_vitc_does_not_know_is_a_newer_vitc(bundle, tmp_path):
    dest = shutil.copytree(bundle, tmp_path / "b")
    raw = json.loads((dest / MANIFEST_FILE).read_text())
    raw["golden"]["digests"].append("signature")
    (dest / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"'golden.digests' lists 'signature', not one this vitc knows: the bundle "
                                          r"may come from a newer vitc \(upgrade vitc"):
        read_manifest(dest)
