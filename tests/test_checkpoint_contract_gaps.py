"""Checkpoint contract gaps: a bit flipped inside resume.pt (its CRC-32s), checkpoint.json's format_version (required,
1 or later), repeated JSON keys (checkpoints and manifests), links out of the checkpoint directory, and a config
field this vitc does not know (a newer vitc's). Each is one line naming the file and what is wrong, exit 2 in a CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from models.bundle import BundleError, read_manifest
from models.checkpoint import META_FILE, CheckpointError, load_checkpoint, read_checkpoint_meta
from models.io import parse_strict_json
from train.state import RESUME_FILE, load_resume

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-bundle-v1"


@pytest.fixture(scope="module")
def saved(micro_checkpoint, tmp_path_factory) -> Path:
    """A vit_c_micro checkpoint as save_checkpoint writes it (shared: tests copy it before changing anything)."""
    return micro_checkpoint(tmp_path_factory.mktemp("gaps"))


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META_FILE).read_text())


def _write_meta(ckpt: Path, doc: dict | str) -> None:
    (ckpt / META_FILE).write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))


def _refused(ckpt: Path, *words: str, load: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        (load_checkpoint if load else read_checkpoint_meta)(ckpt)
    message = str(info.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


# --------------------------------------------------------------------------- 1. resume.pt: every member's CRC-32


def _flip(path: Path, member: str, at: int) -> None:
    """XOR one bit of byte `at` of `member`'s stored data, in place (the zip directory and its CRC-32 untouched)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        offset = info.header_offset + 30 + name_len + extra_len + at
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _largest_tensor(path: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as z:
        return max((m for m in z.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)


@pytest.fixture
def stopped(train_stopped, tmp_path) -> Path:
    """A copy of a TRAIN_TINY run stopped at step 2: checkpoint.json, weights and resume.pt."""
    return Path(shutil.copytree(train_stopped(2), tmp_path / "run"))


def test_a_bit_flipped_inside_a_tensor_of_resume_pt_is_refused_naming_the_member(stopped, capsys, train_cli):
    from train.__main__ import main

    path = stopped / RESUME_FILE
    member = _largest_tensor(path)
    _flip(path, member.filename, member.file_size // 2)
    before = {p.name: p.read_bytes() for p in stopped.iterdir()}
    with pytest.raises(CheckpointError) as info:
        load_resume(stopped)
    message = str(info.value)
    assert f"cannot read resume state {path}: it is corrupt: member {member.filename!r} fails its CRC-32 " \
           f"check" in message, message
    # A checkpoint sits beside it: its own sha256 guards it, and --overwrite is what starts the run again.
    assert "restore resume.pt from a copy" in message and "--overwrite trains it again from step 0" in message
    # The command says it in one line, exit 2, before anything is trained or written.
    code, _, err = train_cli(main, ["--out", str(stopped), "--resume", "--max-steps", "0"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("python -m train: error: cannot read resume state") and member.filename in lines[0]
    assert {p.name: p.read_bytes() for p in stopped.iterdir()} == before
    load_checkpoint(stopped)  # the checkpoint itself is untouched and still loads


@pytest.mark.parametrize(("where", "field", "bit"), [
    ("central", 8, 0),  # the directory's flags: "encrypted" (a RuntimeError from zipfile)
    ("central", 8, 5),  # its flags: "compressed patched data" (NotImplementedError)
    ("local", 26, 5),  # the local header's name length: another name is read (a mismatch, or bytes not UTF-8)
    ("local", 30, 7),  # the local name's first byte: not UTF-8 (UnicodeDecodeError)
])
def test_a_bit_flipped_in_a_member_header_of_resume_pt_is_one_line_not_a_traceback(stopped, where, field, bit):
    """The CRC check read the members through their headers: these flips escaped as tracebacks, exit 1."""
    path = stopped / RESUME_FILE
    with zipfile.ZipFile(path) as z:
        at = (z.infolist()[0].header_offset if where == "local" else z.start_dir) + field
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << bit)]))
    with pytest.raises(CheckpointError, match=rf"cannot read resume state {re.escape(str(path))}: ") as info:
        load_resume(stopped)
    assert "\n" not in str(info.value)


def test_a_corrupt_pickle_member_without_a_checkpoint_beside_it_says_to_train_into_a_new_out(stopped, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(stopped / RESUME_FILE, alone / RESUME_FILE)
    assert load_resume(alone) is not None  # intact: loads
    pickle = next(m for m in zipfile.ZipFile(alone / RESUME_FILE).infolist() if m.filename.endswith("data.pkl"))
    _flip(alone / RESUME_FILE, pickle.filename, pickle.file_size - 3)
    with pytest.raises(CheckpointError) as info:
        load_resume(alone)
    message = str(info.value)
    assert f"member {pickle.filename!r} fails its CRC-32 check" in message, message
    # No checkpoint: --overwrite would refuse the directory (not a run), so it is not offered.
    assert message.endswith("restore resume.pt from a copy to continue the run, or train into a new --out"), message


# ------------------------------------------------------------------------------- 2. checkpoint.json format_version


@pytest.mark.parametrize(("version", "says"), [
    (0, "format_version 0 is not supported"),
    (-7, "format_version -7 is not supported"),
    (..., "field 'format_version' is missing"),
    (2, "format_version 2 is newer than this vitc reads (1); upgrade vitc"),
    ("1", "field 'format_version' must be an integer, got str"),
])
def test_format_version_must_be_an_integer_from_1_to_the_supported_one(ckpt, version, says):
    doc = _meta(ckpt)
    if version is ...:
        del doc["format_version"]
    else:
        doc["format_version"] = version
    _write_meta(ckpt, doc)
    message = _refused(ckpt, str(ckpt / META_FILE), says)
    if isinstance(version, int) and version < 1:
        assert "edited or not written by vitc" in message, message


def test_every_checkpoint_vitc_ever_wrote_has_format_version_1(ckpt):
    """Since the first commit, save_checkpoint writes format_version 1: requiring it refuses no real checkpoint."""
    assert _meta(ckpt)["format_version"] == 1
    assert read_checkpoint_meta(ckpt).model == "vit_c_micro"


# --------------------------------------------------------------------------------------------- 3. repeated keys


def test_parse_strict_json_refuses_a_repeated_key_in_any_object():
    assert parse_strict_json(b'{"a": {"k": 1}, "b": {"k": 2}}', 100) == {"a": {"k": 1}, "b": {"k": 2}}
    for doc in (b'{"k": 1, "k": 2}', b'{"a": [{"x": 1, "k": 0, "k": 0}]}'):
        with pytest.raises(ValueError, match=r"^the key 'k' appears twice in one object"):
            parse_strict_json(doc, 100)


@pytest.mark.parametrize(("key", "first"), [("class_names", '["a"]'), ("depth", "9")])
def test_a_checkpoint_json_naming_a_key_twice_is_refused(ckpt, key, first):
    text = (ckpt / META_FILE).read_text()
    assert text.count(f'"{key}":') == 1
    _write_meta(ckpt, text.replace(f'"{key}":', f'"{key}": {first}, "{key}":'))
    _refused(ckpt, f"corrupt checkpoint metadata {ckpt / META_FILE}", f"the key {key!r} appears twice")


def test_a_manifest_naming_a_key_twice_is_refused(tmp_path):
    bundle = Path(shutil.copytree(LEGACY, tmp_path / "b"))
    read_manifest(bundle)
    text = (bundle / "manifest.json").read_text()
    assert text.count('"class_names":') == 1
    (bundle / "manifest.json").write_text(text.replace('"class_names":', '"class_names": ["x"], "class_names":'))
    with pytest.raises(BundleError, match="the key 'class_names' appears twice in one object"):
        read_manifest(bundle)


# ------------------------------------------------------------------ 4. links out of the checkpoint directory


def test_a_checkpoint_json_linking_out_of_the_directory_is_refused_unread(ckpt, tmp_path, capsys, train_cli):
    from train.eval import main

    outside = tmp_path / "elsewhere.json"
    shutil.move(ckpt / META_FILE, outside)
    (ckpt / META_FILE).symlink_to(outside)
    _refused(ckpt, f"{ckpt / META_FILE} links to a file outside the checkpoint directory")
    code, _, err = train_cli(main, ["--checkpoint", str(ckpt), "--dataset", "animals",
                                    "--out", str(tmp_path / "e.json")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "links to a file outside" in err, err


def test_weights_linking_out_of_the_directory_are_refused(ckpt, tmp_path):
    weights = read_checkpoint_meta(ckpt).weights_path
    shutil.move(weights, tmp_path / "w.safetensors")
    weights.symlink_to(tmp_path / "w.safetensors")
    _refused(ckpt, f"{weights} links to a file outside the checkpoint directory", load=True)


def test_links_that_stay_inside_the_directory_still_read(ckpt, tmp_path):
    weights = read_checkpoint_meta(ckpt).weights_path
    (ckpt / "blobs").mkdir()
    shutil.move(weights, ckpt / "blobs" / weights.name)
    weights.symlink_to(Path("blobs") / weights.name)  # relative, inside
    os.rename(ckpt / META_FILE, ckpt / "blobs" / "meta.json")
    (ckpt / META_FILE).symlink_to(ckpt / "blobs" / "meta.json")
    (alias := tmp_path / "alias").symlink_to(ckpt, target_is_directory=True)  # the directory itself may be a link
    for path in (ckpt, alias):
        model, meta = load_checkpoint(path)
        assert meta.model == "vit_c_micro"


# ------------------------------------------------------------------------- 5. a config field this vitc lacks
@pytest.mark.parametrize("kind", [["conv"], {"x": 1}, 3])
def test_a_stem_kind_of_the_wrong_type_is_refused_naming_it(ckpt, kind):
    # A list or object here crashed the newer-field check with "TypeError: unhashable type" (hDG).
    doc = _meta(ckpt)
    doc["config"]["stem"]["kind"] = kind
    _write_meta(ckpt, doc)
    message = _refused(ckpt, f"unknown stem kind {kind!r}")
    assert "unhashable" not in message, message




@pytest.mark.parametrize(("where", "field"), [
    ((), "x_future"),
    (("stem",), "x_future"),
    (("stem", "layers", 1), "groups"),
])
def test_an_unknown_config_field_is_said_to_come_from_a_newer_vitc(ckpt, where, field):
    doc = _meta(ckpt)
    target = doc["config"]
    for step in where:
        target = target[step]
    target[field] = 1
    _write_meta(ckpt, doc)
    dotted = "config" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in where) + f".{field}"
    message = _refused(ckpt, f"field {dotted!r} is not one this vitc knows", "may come from a newer vitc")
    assert "unexpected keyword argument" not in message and "__init__" not in message, message


@pytest.mark.parametrize(("section", "field"), [("preprocessing", "antialias"), ("weights", "dtype")])
def test_an_unknown_preprocessing_or_weights_key_is_said_to_come_from_a_newer_vitc(ckpt, section, field):
    # A newer vitc's preprocessing key was "corrupt checkpoint metadata", and one in `weights` (say a dtype the
    # weights were stored in) was ignored: the weights would have been read as this vitc's float32.
    doc = _meta(ckpt)
    doc[section][field] = "x"
    _write_meta(ckpt, doc)
    message = _refused(ckpt, f"field '{section}.{field}' is not one this vitc knows", "may come from a newer vitc")
    assert "corrupt" not in message, message
