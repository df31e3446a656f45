"""16-bit, 32-bit, float and alpha images past the evaluation pipeline: `serve.sample` writes, and
`export.report --served` sends, the pixels the model sees (the shared `to_mode` conversion), so serving them gives
what evaluation gives; an image that cannot be encoded is named, one line; a bundle path relative to the caller's
directory is measured (the server runs elsewhere)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import one_line

from data.datasets import default_preprocessing, load_dataset
from export import report, served
from models.bundle import read_manifest
from models.preprocessing import Preprocessing, preprocess
from serve.imaging import prepare

REPORT_ERROR = "python -m export.report: error: "

H, W = 40, 48  # more than the 37-pixel resize target of a 32-pixel model: every path scales


def _ramp() -> np.ndarray:
    """(H, W) float32 in 0.05..0.95, smooth (JPEG keeps it), so the modes' scales show."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return 0.05 + 0.9 * (0.7 * x / (W - 1) + 0.3 * y / (H - 1))


def _palette_with_transparency() -> Image.Image:
    """P with a tRNS entry: index 0, a block in the centre, is bright white but transparent (composited on black,
    it is black)."""
    index = 1 + (_ramp() * 6.99).astype(np.uint8)
    index[H // 2 - 6:H // 2 + 6, W // 2 - 6:W // 2 + 6] = 0
    img = Image.fromarray(index, "P")
    img.putpalette([255, 255, 255] + [v for k in range(1, 8) for v in (40 + 20 * k, 60 + 15 * k, 100)])
    img.info["transparency"] = 0
    return img


def _alpha(mode: str) -> Image.Image:
    g = _ramp()
    rgb = np.stack([g, g[::-1], 1 - g], axis=2)
    colour = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    alpha = Image.fromarray(((1 - g) * 255).round().astype(np.uint8), "L")
    if mode == "LA":
        colour = colour.convert("L")
    colour.putalpha(alpha)
    return colour


# file name -> the image saved there; each decodes to the mode it is named for
IMAGES = {
    "float.tif": lambda: Image.fromarray(_ramp(), "F"),  # floats are 0..1
    "int32.tif": lambda: Image.fromarray((_ramp() * 65535).round().astype(np.int32)),  # "I": 0..65535
    "sixteen.png": lambda: Image.fromarray((_ramp() * 65535).round().astype(np.uint16)),  # "I;16"
    "rgba.png": lambda: _alpha("RGBA"),
    "la.png": lambda: _alpha("LA"),
    "palette.png": _palette_with_transparency,
}
MODES = {"float.tif": "F", "int32.tif": "I", "sixteen.png": "I;16", "rgba.png": "RGBA", "la.png": "LA",
         "palette.png": "P"}


def _dataset(root: Path) -> Path:
    """root/{train,val}/{a,b}/: the IMAGES in val/a, plain RGB ramps elsewhere; returns root."""
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(2):
                g = _ramp() if cls == "a" else _ramp()[::-1]
                rgb = np.stack([g, np.roll(g, 5 * k, axis=1), 1 - g], axis=2)
                Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB").save(d / f"rgb{k}.png")
    for name, make in IMAGES.items():
        img = make()
        img.save(root / "val" / "a" / name, **({"transparency": 0} if name == "palette.png" else {}))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    ds = _dataset(tmp_path_factory.mktemp("modes") / "data")
    val = load_dataset(ds, "val")
    for name, mode in MODES.items():  # the dataset decodes each in the mode it is meant to test
        assert val.image(val.paths.index(ds / "val" / "a" / name)).mode == mode
    return ds


def _served_input(data: bytes, spec: Preprocessing) -> np.ndarray:
    """What the server feeds the model for these bytes (full decode, no JPEG draft)."""
    return prepare(data, spec, max_pixels=10**8, jpeg_draft=False)


# Mean |difference| of the model input from the evaluation pipeline's (normalised units): a smooth image through
# JPEG stays well under it; a saturated 16-bit image, a black float image or a dropped alpha is far above it.
JPEG_CLOSE = 0.1


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_served_path_encodes_the_pixels_the_model_sees(name, mode):
    """export.report --served sent a float image's PNG as an encoder error, a 16-bit PNG as an all-white JPEG and
    RGBA without its alpha: the server was charged with disagreements it does not make."""
    img = IMAGES[name]()
    spec = Preprocessing(resize=37, crop=32, mode=mode)
    reference = preprocess([img], spec)
    encoded = served.encodings(img, spec)
    # The PNG carries the converted pixels exactly: the server computes the evaluation pipeline's input bitwise.
    np.testing.assert_array_equal(_served_input(encoded["png-native"], spec), reference)
    for enc, body in encoded.items():
        if enc.startswith("jpeg"):
            assert Image.open(io.BytesIO(body)).mode == mode, enc  # 8-bit, in the model's colour space
            diff = float(np.abs(_served_input(body, spec) - reference).mean())
            assert diff < JPEG_CLOSE, (enc, diff)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_sample_writes_the_pixels_the_model_sees(data, tmp_path, capsys, name, suffix):
    """serve.sample crashed on float and 32-bit grey images (cannot write mode F as PNG) and wrote 16-bit images
    saturated and alpha dropped as JPEG: served, the file got another class than evaluation gives the image."""
    from serve.sample import main

    val = load_dataset(data, "val")
    index = val.paths.index(data / "val" / "a" / name)
    out = tmp_path / f"s{suffix}"
    assert main(["--dataset", str(data), "--index", str(index), "--out", str(out)]) == 0
    assert f"val #{index}, label a" in capsys.readouterr().out
    spec = default_preprocessing(str(data), 32)  # what a model trained on this folder uses: RGB
    reference = preprocess([val.image(index)], spec)
    written = out.read_bytes()
    assert Image.open(io.BytesIO(written)).mode == "RGB"
    got = _served_input(written, spec)
    if suffix == ".png":  # lossless: exactly the evaluation pipeline's input
        np.testing.assert_array_equal(got, reference)
    else:
        diff = float(np.abs(got - reference).mean())
        assert diff < JPEG_CLOSE, diff


@pytest.mark.parametrize(("file", "out", "says"), [
    # WebP holds at most 16383 pixels a side
    ("wide.png", "s.webp", "(RGB 17000x2): cannot write it as WEBP: more than 16383 pixels a side"),
    # a float image with a NaN pixel has no 8-bit value (training and the server refuse it too)
    ("nan.tif", "s.png", "(F 48x40): cannot write it as PNG: the image has non-finite pixel values"),
])
def test_sample_an_image_it_cannot_write_is_one_line(tmp_path, capsys, file, out, says):
    """An image the encoder or the conversion refuses: one line and exit 2, not a traceback; nothing written."""
    from serve.sample import main

    ds = _dataset(tmp_path / "d")
    nan = _ramp()
    nan[3, 4] = np.nan
    Image.fromarray(nan, "F").save(ds / "val" / "a" / "nan.tif")
    Image.new("RGB", (17000, 2), (200, 10, 10)).save(ds / "val" / "a" / "wide.png")
    val = load_dataset(ds, "val")
    index = val.paths.index(ds / "val" / "a" / file)
    assert main(["--dataset", str(ds), "--index", str(index), "--out", str(tmp_path / out)]) == 2
    err = one_line(capsys)
    assert f"val #{index} {says}" in err, err
    assert not (tmp_path / out).exists()


def test_sample_on_a_full_disk_is_a_machine_failure(tmp_path, monkeypatch, capsys):
    """A full disk is the machine failing, not bad input: one line and exit 1 (it said exit 2, as for a bad --out)."""
    import errno

    from models import cli
    from serve import sample

    def full(path, _data):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sample, "atomic_write_bytes", full)
    out = tmp_path / "s.png"
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: sample.main(["--dataset", str(_dataset(tmp_path / "d")), "--out", str(out)]), sample.PROG)
    assert info.value.code == 1
    assert one_line(capsys) == f"{sample.PROG}: error: No space left on device: {out} was not written"


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory) -> Path:
    """A vit_c_micro bundle (random head, ONNX) of the `data` folder, exported as `python -m export` does."""
    import torch

    from export.bundle import build_bundle
    from models import build_model
    from models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("modes-bundle")
    torch.manual_seed(0)
    model = build_model("vit_c_micro", num_classes=2).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
    ckpt = save_checkpoint(root / "ckpt", model, class_names=["a", "b"],
                           preprocessing=default_preprocessing(str(data), 32), extra={"dataset": str(data)})
    build_bundle(ckpt, root / "b", targets=("onnx",), name="b", max_batch=8, parity_samples=8, calibration_samples=4,
                 log=lambda _: None)
    return root / "b"


def test_report_served_measures_a_relative_bundle_with_16bit_float_and_alpha_images(bundle, monkeypatch, capsys):
    """`export.report exp/b --served` started a server (in the repository) that could not find `exp/b`; and a
    dataset with float or 32-bit images stopped it with "cannot record it in the manifest: cannot write mode F as
    PNG". Both run now, and the PNGs agree with the evaluation pipeline on every image."""
    monkeypatch.chdir(bundle.parent)
    assert report.main([bundle.name, "--served"]) == 0, capsys.readouterr().err
    record = read_manifest(bundle).served
    n = len(load_dataset(read_manifest(bundle).source.dataset, "val"))
    assert record is not None and record.samples == n
    assert record.encodings["png-native"]["agreement"] == 1.0
    assert "Served path (onnxruntime, " in capsys.readouterr().out


def test_report_served_says_which_file_failed_not_always_the_manifest(bundle, monkeypatch, capsys):
    """Every OSError of the measurement was reported as "cannot record it in the manifest"; the manifest is named
    only when writing it fails, and any other file as itself."""
    import contextlib
    import errno

    from models import bundle as bundle_module

    @contextlib.contextmanager
    def no_server(*_args, **_kwargs):  # the measurement's own steps, without its servers and runtimes
        yield type("Server", (), {"url": "http://127.0.0.1:9"})()

    monkeypatch.setattr("serve.launch.start", no_server)
    monkeypatch.setattr(served, "_reference", lambda _b, _m, images: np.zeros(len(images), np.int64))
    monkeypatch.setattr(served, "_classify", lambda _url, _name, bodies: [0] * len(bodies))

    def refuse(path, _data):  # noqa: ANN001
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(bundle_module, "atomic_write_bytes", refuse)
    before = (bundle / "manifest.json").read_bytes()
    assert report.main([str(bundle), "--served"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"{REPORT_ERROR}served path: cannot record it in {bundle / 'manifest.json'}: Permission denied", err

    def unreadable(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/some/file")

    monkeypatch.setattr(served, "measure", unreadable)
    assert report.main([str(bundle), "--served"]) == 2
    assert one_line(capsys) == REPORT_ERROR + "served path: Permission denied: /srv/some/file"
    assert (bundle / "manifest.json").read_bytes() == before
