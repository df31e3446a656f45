"""`export.report --served` with a valid val image too long to send as a JPEG at 8x the resize target (libjpeg
holds 65,500 pixels a side: a 4000x10 strip, a panorama): the image is left out of the measurement, named and
counted, and the rest is measured; it stopped the whole check with exit 2."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import fake_runtime
import numpy as np
import pytest
from PIL import Image

from export import report, served
from models.bundle import read_manifest, write_manifest
from models.preprocessing import Preprocessing

REPORT_ERROR = "python -m export.report: error: "

GREY = Preprocessing(resize=32, crop=32, mean=(0.2728,) * 3, std=(0.4057,) * 3, mode="L")  # the legacy bundle's


def _folder(root: Path, wide: dict[str, tuple[int, int]]) -> Path:
    """root/{train,val}/{Bear,Bird}/ with two small ramps each, plus the `wide` images ("val/class/name" -> size)."""
    y, x = np.mgrid[0:40, 0:48]
    for split in ("train", "val"):
        for k, cls in enumerate(("Bear", "Bird")):  # two of the legacy bundle's classes
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(2):
                ramp = ((x * (2 + j) + y * (1 + 2 * k)) % 256).astype(np.uint8)
                Image.fromarray(ramp, "L").save(d / f"ramp{j}.png")
    for name, size in wide.items():
        Image.linear_gradient("L").resize(size).save(root / name)
    return root


def _bundle(dest: Path, dataset: Path) -> Path:
    """The legacy test bundle (vit_c_micro, grey, ONNX + torch), recorded as made from `dataset`."""
    shutil.copytree(fake_runtime.LEGACY, dest)
    m = read_manifest(dest)
    assert m.preprocessing == GREY
    write_manifest(dest, replace(m, source=replace(m.source, dataset=str(dataset))))
    return dest


def test_too_long_for_jpeg_is_where_the_jpeg_encoder_stops():
    """The test of `too_long_for_jpeg` is the one `encodings` meets: 255:1 makes a 65280-pixel JPEG, 256:1 cannot."""
    assert served.too_long_for_jpeg((255, 1), GREY) is None
    assert served.too_long_for_jpeg((1, 256), GREY) == (256, 65536)
    assert served.too_long_for_jpeg((4000, 10), GREY) == (102400, 256)
    longest = served.encodings(Image.new("L", (255, 1), 90), GREY)
    assert max(Image.open(io.BytesIO(longest["jpeg75-256"])).size) == 65280
    with pytest.raises(ValueError, match="more than 65500 pixels a side"):
        served.encodings(Image.new("L", (256, 1), 90), GREY)


def test_report_served_leaves_out_an_image_too_long_for_a_jpeg_and_measures_the_rest(tmp_path, capsys):
    """The report's case: a 4000x10 strip among the val images. It stopped the check ("cannot encode val image
    ... JPEG 102400x256: more than 65500 pixels a side", exit 2), though the server classifies it; now it is left
    out with a note naming it, and the other images are measured through a real server and recorded."""
    data = _folder(tmp_path / "data", {"val/Bird/wide4000x10.png": (4000, 10)})
    bundle = _bundle(tmp_path / "b", data)
    assert report.main([str(bundle), "--served"]) == 0
    out, err = capsys.readouterr()
    wide = data / "val" / "Bird" / "wide4000x10.png"
    progress = err.splitlines()[0]
    assert progress.startswith("legacy: 4 ") and (
        f", 1 left out as too long to send as a JPEG at 8x the resize target (more than 65500 pixels a side; {wide} "
        "4000x10 would be 102400x256)") in progress, err
    _assert_measured_four(bundle, out, err, resize=32)


def test_report_served_with_only_images_too_long_for_a_jpeg_is_one_line(tmp_path, monkeypatch, capsys):
    """Nothing left to measure: one line naming the first image and how many there are, exit 2, manifest kept."""
    data = _folder(tmp_path / "data", {"val/Bear/strip.png": (9000, 10), "val/Bird/tall.png": (10, 30000)})
    for ramp in data.glob("val/*/ramp*.png"):
        ramp.unlink()
    bundle = _bundle(tmp_path / "b", data)
    monkeypatch.setattr("serve.launch.start", None)  # nothing is served: the check stops before any server
    before = (bundle / "manifest.json").read_bytes()
    assert report.main([str(bundle), "--served"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    strip = data / "val" / "Bear" / "strip.png"
    assert err[0] == (REPORT_ERROR + "served path: no val image to measure: all 2 chosen are too long to send as a "
                      f"JPEG at 8x the resize target (more than 65500 pixels a side; {strip} 9000x10 would be "
                      "230400x256, and 1 more)"), err
    assert (bundle / "manifest.json").read_bytes() == before


def test_an_image_the_encoder_refuses_for_another_reason_still_stops_the_check_naming_it(tmp_path, monkeypatch,
                                                                                          capsys):
    """Only the JPEG side limit, a property of the format, leaves an image out: any other encoder failure is
    unexpected and still stops the check with one line naming the file, before any server starts."""
    data = _folder(tmp_path / "data", {"val/Bird/odd.png": (47, 41)})
    bundle = _bundle(tmp_path / "b", data)
    encodings = served.encodings

    def refuse_one(img, spec):  # noqa: ANN001, ANN202
        if img.size == (47, 41):
            raise ValueError("PNG 47x41: broken data stream")
        return encodings(img, spec)

    monkeypatch.setattr(served, "encodings", refuse_one)
    monkeypatch.setattr("serve.launch.start", None)
    before = (bundle / "manifest.json").read_bytes()
    assert report.main([str(bundle), "--served"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[-1] == (
        f"{REPORT_ERROR}served path: cannot encode val image {data / 'val' / 'Bird' / 'odd.png'} (L 47x41) as the PNG "
        "and JPEG a client sends: PNG 47x41: broken data stream"), err
    assert (bundle / "manifest.json").read_bytes() == before


# A 224-pixel model's preprocessing (resize 256) on the legacy bundle's 32-pixel input: its 8x JPEGs have a short
# side of 2048, so past 9.5:1 they have more pixels than the server's 40 M default allows.
WIDE224 = replace(GREY, resize=256)


def _bundle224(dest: Path, dataset: Path) -> Path:
    """The legacy bundle with the resize target of a 224-pixel model (resize 256, centre crop 32)."""
    _bundle(dest, dataset)
    write_manifest(dest, replace(read_manifest(dest), preprocessing=WIDE224))
    return dest


def test_too_many_pixels_is_where_the_server_the_check_starts_refuses():
    """The report's case: 2400x240 (10:1) is 20480x2048 = 41,943,040 pixels as the 8x JPEG of a 224-pixel model,
    over the 40 M limit `measure` gives its server; 9.375:1 fits. A native image over the limit is named as the PNG."""
    assert served.DEFAULT_MAX_IMAGE_PIXELS == 40_000_000
    assert served.too_many_pixels((2400, 240), WIDE224) == ("as a JPEG at 8x the resize target", (20480, 2048))
    assert served.too_many_pixels((2250, 240), WIDE224) is None  # 19200x2048 = 39,321,600
    assert served.too_many_pixels((2400, 240), WIDE224, max_pixels=20480 * 2048) is None  # the limit is allowed
    assert served.too_many_pixels((7000, 7000), WIDE224) == ("as a PNG at its own size", (7000, 7000))
    assert served.too_many_pixels((2400, 240), GREY) is None  # a 32-pixel model's 8x JPEG: 2560x256
    assert served.too_long_for_jpeg((2400, 240), WIDE224) is None  # within JPEG's side: the pixel limit is what stops


def test_report_served_leaves_out_an_image_over_the_servers_pixel_limit_and_measures_the_rest(tmp_path, monkeypatch,
                                                                                              capsys):
    """The report's case: a valid 10:1 val image (2400x240) of a 224-pixel model made a 20480x2048 JPEG at 8x,
    which the server answered 413, stopping the check with exit 2 after the smaller encodings had run. Now it is
    left out of every encoding before any work, named; the rest is measured through a real server. The server's
    limits are the check's own (flags), not VITC_* ones from the environment: its body limit holds the largest
    body sent (a PNG of a big photo is over the 16 MiB default; here every JPEG is over the 1 KiB set)."""
    data = _folder(tmp_path / "data", {"val/Bird/wide10to1.png": (2400, 240)})
    bundle = _bundle224(tmp_path / "b", data)
    monkeypatch.setenv("VITC_MAX_IMAGE_PIXELS", "1000")  # a server configured for something else
    monkeypatch.setenv("VITC_MAX_BODY_BYTES", "1024")
    assert report.main([str(bundle), "--served"]) == 0
    out, err = capsys.readouterr()
    wide = data / "val" / "Bird" / "wide10to1.png"
    progress = err.splitlines()[0]
    assert progress.startswith("legacy: 4 ") and progress.endswith(
        ", 1 left out as too big for the server's pixel limit (more than 40000000 pixels, its --max-image-pixels; "
        f"{wide} 2400x240 would be 20480x2048 = 41943040 pixels as a JPEG at 8x the resize target), reference on "
        "their own pixels ..."), err
    _assert_measured_four(bundle, out, err, resize=256)


def test_report_served_with_every_image_refused_for_either_reason_is_one_line(tmp_path, monkeypatch, capsys):
    """Images left out for both reasons, none left: one line naming each reason's first image and count, exit 2,
    manifest kept, no server started."""
    data = _folder(tmp_path / "data", {"val/Bear/strip.png": (9000, 10), "val/Bear/wide.png": (2400, 240),
                                       "val/Bird/wider.png": (3000, 240)})
    for ramp in data.glob("val/*/ramp*.png"):
        ramp.unlink()
    bundle = _bundle224(tmp_path / "b", data)
    monkeypatch.setattr("serve.launch.start", None)
    before = (bundle / "manifest.json").read_bytes()
    assert report.main([str(bundle), "--served"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    a = data / "val" / "Bear"
    assert err[0] == (
        REPORT_ERROR + "served path: no val image to measure: all 3 chosen are left out, 1 as too long to send as a "
        f"JPEG at 8x the resize target (more than 65500 pixels a side; {a / 'strip.png'} 9000x10 would be "
        "1843200x2048), 2 as too big for the server's pixel limit (more than 40000000 pixels, its --max-image-pixels; "
        f"{a / 'wide.png'} 2400x240 would be 20480x2048 = 41943040 pixels as a JPEG at 8x the resize target, and 1 "
        "more)"), err
    assert (bundle / "manifest.json").read_bytes() == before


def _assert_measured_four(bundle: Path, out: str, err: str, resize: int) -> None:
    """The check ran without an error on the four ramps, each encoded every way at `resize`'s scales."""
    assert "error" not in err and "Traceback" not in err, err
    record = read_manifest(bundle).served
    assert record is not None and record.samples == 4
    assert record.encodings["png-native"]["agreement"] == 1.0
    assert set(record.encodings) == {"png-native"} | {f"jpeg{q}-{resize * s}" for q in served.QUALITIES
                                                      for s in served.SCALES}
    assert "Served path (onnxruntime, 4 val images" in out
