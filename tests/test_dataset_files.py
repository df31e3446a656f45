"""Which files of a folder dataset are images, and which are counted as unreadable: the dataset readers (training,
train.eval, export's parity and calibration images) read what the server reads, and refuse what it refuses."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from data.datasets import IMAGE_SUFFIXES, UnreadableImage, decode_checked, load_dataset
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, image_formats

AVIF = "AVIF" in image_formats()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def black_png(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit w x h PNG of a few kB, written without Pillow allocating its pixels."""
    rows = zlib.compress((b"\0" * (1 + (w + 7) // 8)) * h, 9)  # each row: filter byte 0, then zero bits
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))
    return path


def _image(path: Path, seed: int = 0, **save) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return path


def test_the_dataset_pixel_bound_is_the_servers(tmp_path):
    import inspect

    from serve.imaging import ImageError, open_image
    from serve.settings import Settings
    from serve.tensor import image_tensor

    tensor_default = inspect.signature(image_tensor).parameters["max_pixels"].default
    assert Settings.model_fields["max_image_pixels"].default == DEFAULT_MAX_IMAGE_PIXELS == tensor_default
    big = black_png(tmp_path / "big.png", 8000, 5001)  # 40,008,000 pixels, a few kB; below Pillow's own bound
    with pytest.raises(ImageError) as refused:
        open_image(big.read_bytes(), max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    assert refused.value.status == 413
    assert decode_checked(big) is None  # the dataset refuses it too, as unreadable


def test_an_image_over_the_bound_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    big = black_png(tmp_path / "big.png", 8000, 5001)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size))
    assert decode_checked(big) is None
    assert loads == []  # its 40 M pixels were never decoded


def test_the_bound_is_inclusive_as_the_servers(tmp_path, monkeypatch):
    import data.datasets

    path = _image(tmp_path / "a.png")  # 20 x 20
    monkeypatch.setattr(data.datasets, "DEFAULT_MAX_IMAGE_PIXELS", 400)
    assert decode_checked(path) is not None
    monkeypatch.setattr(data.datasets, "DEFAULT_MAX_IMAGE_PIXELS", 399)
    assert decode_checked(path) is None


def test_a_bomb_over_pillows_warning_bound_is_refused_without_a_warning(tmp_path):
    bomb = black_png(tmp_path / "bomb.png", 10_000, 10_000)  # 100 M pixels: Pillow warns above 89.5 M
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_checked(bomb) is None
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def _folder(root: Path) -> Path:
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                _image(d / f"{i}.png", seed=i)
    return root


def test_every_suffix_pillow_gives_the_servers_formats_is_listed(tmp_path):
    Image.init()
    given = {ext for ext, fmt in Image.registered_extensions().items() if fmt in image_formats()}
    assert given <= IMAGE_SUFFIXES, sorted(given - IMAGE_SUFFIXES)
    root = _folder(tmp_path / "d")
    cls = root / "val" / "a"
    _image(cls / "chrome.jfif", format="JPEG")
    _image(cls / "old.JPE", format="JPEG")
    names = {p.name for p in load_dataset(root, "val").paths}
    assert {"chrome.jfif", "old.JPE"} <= names
    for name in ("chrome.jfif", "old.JPE"):
        assert decode_checked(cls / name) is not None


@pytest.mark.skipif(not AVIF, reason="this Pillow build does not decode AVIF")
def test_a_class_of_avif_images_is_read(tmp_path):
    root = _folder(tmp_path / "d")
    only = root / "train" / "avif class"
    only.mkdir()
    for i in range(2):
        _image(only / f"{i}.avif", seed=i, format="AVIF")
    train = load_dataset(root, "train")  # no longer "a class directory with no image file"
    avifs = [p for p in train.paths if p.suffix == ".avif"]
    assert len(avifs) == 2 and all(decode_checked(p) is not None for p in avifs)
    assert train.readable(range(len(train)), len(train)).skipped == ()


def test_hidden_files_are_left_out_and_a_dangling_link_is_counted_unreadable(tmp_path):
    root = _folder(tmp_path / "d")
    cls = root / "val" / "a"
    (cls / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble metadata
    _image(cls / ".hidden.png")
    (cls / "gone.png").symlink_to(cls / "no-such-file.png")
    (cls / "loop.png").symlink_to(cls / "loop.png")
    (cls / "link.png").symlink_to(cls / "0.png")
    val = load_dataset(root, "val")
    names = sorted(p.name for p in val.paths if p.parent == cls)
    assert names == ["0.png", "1.png", "2.png", "gone.png", "link.png", "loop.png"]
    assert len(val.fingerprint()) == 64  # a dangling link has no size, and no error either
    drawn = val.readable(range(len(val)), len(val))
    assert sorted(p.name for p in drawn.skipped) == ["gone.png", "loop.png"]
    assert drawn.note() == ", 2 unreadable files skipped"
    with pytest.raises(UnreadableImage, match="corrupt or unreadable image: .*gone.png"):
        val.image(val.paths.index(cls / "gone.png"))
    # A folder whose only extra files are AppleDouble ones has nothing unreadable (--corrupt fail passes).
    for p in ("gone.png", "loop.png"):
        (cls / p).unlink()
    val = load_dataset(root, "val")
    assert val.readable(range(len(val)), len(val)).skipped == ()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_cli) -> Path:
    """A vit_c_micro trained for one epoch on a small folder."""
    from train.__main__ import main as train_main

    base = tmp_path_factory.mktemp("dataset_files")
    data = _folder(base / "data")
    code, _, err = train_cli(train_main, ["--model", "vit_c_micro", "--dataset", str(data), "--epochs", "1",
                                          "--batch-size", "4", "--threads", "1", "--workers", "0",
                                          "--out", str(base / "run")])
    assert code == 0, err
    return base / "run"


def test_train_eval_counts_what_the_server_refuses_and_skips_hidden_files(checkpoint, tmp_path):
    from train.evaluate import evaluate_checkpoint

    root = _folder(tmp_path / "d")
    cls = root / "val" / "b"
    _image(cls / "chrome.jfif", format="JPEG")
    (cls / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (cls / ".DS_Store.png").write_bytes(b"Bud1")
    assert evaluate_checkpoint(checkpoint, str(root), corrupt="fail")["samples"] == 7  # hidden files: not images
    black_png(cls / "big.png", 8000, 5001)  # the server answers 413
    (cls / "gone.png").symlink_to(cls / "no-such-file.png")
    result = evaluate_checkpoint(checkpoint, str(root))
    assert (result["samples"], result["skipped_corrupt"]) == (7, 2)
    with pytest.raises(UnreadableImage, match="corrupt or unreadable image"):
        evaluate_checkpoint(checkpoint, str(root), corrupt="fail")
