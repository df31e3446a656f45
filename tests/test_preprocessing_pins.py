"""The preprocessing contract pinned to numbers worked out by hand, not to itself: where the centre crop lies (to
the pixel), channel order R, G, B with each channel's own mean/std, bilinear as the default filter, the ImageNet
preset's 256/224 resize, every EXIF orientation, JPEG draft decoding that stays at or above the resize target, and
the trainer's batches normalised exactly as evaluation and the server normalise theirs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import encode

from data.datasets import decode_checked
from models.preprocessing import Preprocessing, normalize, preprocess, to_uint8
from serve.imaging import load_pixels, open_image, pixel_limit, prepare

LIMIT = 10_000_000
MEAN, STD = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)  # a different normalisation on each channel


def ramp(w: int = 21, h: int = 13) -> np.ndarray:
    """(h, w, 3) uint8, linear in x and y and different on each channel: R = 10x + 5, G = 15y + 20,
    B = 250 - 5x - 7y. Pixel (x=0, y=0) is (5, 20, 250), the centre (x=10, y=6) is (105, 110, 158)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([10 * x + 5, 15 * y + 20, 250 - 5 * x - 7 * y], axis=-1).astype(np.uint8)


def by_hand(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W): (v / 255 - mean[c]) / std[c], in float64, channel c of the image in plane c."""
    v = pixels.astype(np.float64) / 255
    return np.stack([(v[..., c] - mean[c]) / std[c] for c in range(3)])[None]


def served(data: bytes, spec: Preprocessing) -> np.ndarray:
    return prepare(data, spec, max_pixels=LIMIT)


def dataset_image(data: bytes, tmp_path) -> Image.Image:
    """The decoded image a dataset folder holding this file gives training and evaluation."""
    path = tmp_path / "img.png"
    path.write_bytes(data)
    img = decode_checked(path)
    assert img is not None
    return img


def from_dataset(data: bytes, spec: Preprocessing, tmp_path) -> np.ndarray:
    """What training's evaluation makes of the same file in a dataset folder."""
    return preprocess([dataset_image(data, tmp_path)], spec)


def served_pixels(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """The decoded image the server preprocesses (prepare's `open_image` + `load_pixels`)."""
    with pixel_limit(LIMIT):
        return load_pixels(open_image(data, max_pixels=LIMIT, draft_size=draft_size))


# --- the centre crop and the channels ----------------------------------------------------------------------------


def test_a_plain_centre_crop_lands_on_the_centre_pixel_in_rgb_order(tmp_path):
    # 21 x 13, shorter side already 13: no resampling, the crop is the 8 x 8 square at left (21 - 8) // 2 = 6,
    # top (13 - 8) // 2 = 2. Its first pixel is (x=6, y=2): (65, 50, 206); its last (x=13, y=9): (135, 155, 122).
    spec = Preprocessing(resize=13, crop=8, mean=MEAN, std=STD)
    data = encode(Image.fromarray(ramp()), "PNG")
    window = ramp()[2:10, 6:14]
    assert window[0, 0].tolist() == [65, 50, 206] and window[-1, -1].tolist() == [135, 155, 122]
    np.testing.assert_array_equal(to_uint8(dataset_image(data, tmp_path), spec), window)
    # Channel 0 is red, normalised by red's mean and std: at the first pixel (65 / 255 - 0.1) / 0.2 = 0.774510,
    # then (50 / 255 - 0.5) / 0.3 = -1.013072 and (206 / 255 - 0.9) / 0.4 = -0.230392.
    expected = by_hand(window, MEAN, STD)
    assert expected[0, :, 0, 0] == pytest.approx([0.774510, -1.013072, -0.230392], abs=1e-6)
    np.testing.assert_allclose(served(data, spec), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_dataset(data, spec, tmp_path), expected, rtol=0, atol=1e-5)


def test_a_resized_centre_crop_lands_on_the_centre_pixel_in_rgb_order(tmp_path):
    # The ramp at twice the size (each pixel a 2 x 2 block), shorter side 26 -> 13: the image resized is the ramp
    # itself (a linear ramp survives the bilinear halving), and the crop is the same window as above.
    big = np.repeat(np.repeat(ramp(), 2, axis=0), 2, axis=1)  # 42 x 26
    spec = Preprocessing(resize=13, crop=8, mean=MEAN, std=STD)
    data = encode(Image.fromarray(big), "PNG")
    window = ramp()[2:10, 6:14]
    got = to_uint8(Image.fromarray(big), spec).astype(int)
    assert np.abs(got - window).max() <= 1  # PIL's fixed-point weights may round a level off
    one_level = 1 / 255 / min(STD) + 1e-5
    expected = by_hand(window, MEAN, STD)
    np.testing.assert_allclose(served(data, spec), expected, rtol=0, atol=one_level)
    np.testing.assert_allclose(from_dataset(data, spec, tmp_path), expected, rtol=0, atol=one_level)


# --- the default filter and the ImageNet preset ------------------------------------------------------------------


def _edges(w: int = 60, h: int = 40) -> Image.Image:
    """Hard-edged random coloured 4 x 4 squares: a filter that reaches further (bicubic) rings at their edges."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1))


def test_the_default_filter_is_bilinear():
    # 60 x 40, shorter side to 26: the whole image resized to 39 x 26 (by PIL, an independent reference), then
    # its centre 20 x 20 from left (39 - 20) // 2 = 9, top (26 - 20) // 2 = 3.
    img = _edges()
    spec = Preprocessing(resize=26, crop=20, mean=MEAN, std=STD)  # interpolation left to its default

    def reference(resample: Image.Resampling) -> np.ndarray:
        return np.asarray(img.resize((39, 26), resample), np.int16)[3:23, 9:29]

    bilinear, bicubic = reference(Image.Resampling.BILINEAR), reference(Image.Resampling.BICUBIC)
    assert np.abs(bilinear - bicubic).max() > 8  # the two filters are told apart by this image
    served_input = served(encode(img, "PNG"), spec)
    assert np.abs(to_uint8(img, spec).astype(np.int16) - bilinear).max() <= 1
    np.testing.assert_allclose(served_input, by_hand(bilinear.astype(np.uint8), MEAN, STD), rtol=0,
                               atol=1 / 255 / min(STD) + 1e-5)


def test_the_imagenet_preset_resizes_to_256_then_crops_224():
    # A 320 x 256 photo: its shorter side is already 256, so the paper's transform resizes nothing and takes the
    # 224 x 224 square from left (320 - 224) // 2 = 48, top (256 - 224) // 2 = 16, normalised by ImageNet's
    # mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    arr = np.random.default_rng(7).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    got = served(encode(Image.fromarray(arr), "PNG"), Preprocessing.imagenet())
    expected = by_hand(arr[16:240, 48:272], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # Another size keeps the ratio: a 37 x 37 image (round(32 * 256 / 224) = 37) cropped to its centre 32.
    small = np.random.default_rng(8).integers(0, 256, (37, 37, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(Image.fromarray(small), Preprocessing.imagenet(32)), small[2:34, 2:34])


# --- EXIF orientation ---------------------------------------------------------------------------------------------


def _stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for the upright picture `upright` under an EXIF orientation (TIFF 6.0: where
    the stored 0th row and 0th column lie in the picture as seen)."""
    return {
        1: upright,                              # top, left
        2: upright[:, ::-1],                     # top, right: mirrored
        3: upright[::-1, ::-1],                  # bottom, right: turned 180 degrees
        4: upright[::-1, :],                     # bottom, left: flipped
        5: upright.transpose(1, 0, 2),           # left, top: transposed
        6: np.rot90(upright, 1),                 # right, top: turned 90 degrees clockwise to be seen
        7: upright[::-1, ::-1].transpose(1, 0, 2),  # right, bottom: transversed
        8: np.rot90(upright, -1),                # left, bottom: turned 90 degrees anticlockwise to be seen
    }[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_picture(orientation, tmp_path):
    upright = ramp(7, 4)  # not square, no symmetry: each of the eight stored forms differs
    stored = np.ascontiguousarray(_stored(upright, orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif)
    np.testing.assert_array_equal(np.asarray(served_pixels(data)), upright)
    np.testing.assert_array_equal(np.asarray(dataset_image(data, tmp_path)), upright)
    spec = Preprocessing(resize=4, crop=4, mean=MEAN, std=STD)  # the centre 4 x 4 of the upright 7 x 4
    np.testing.assert_allclose(served(data, spec), by_hand(upright[:, 1:5], MEAN, STD), rtol=0, atol=1e-5)


# --- JPEG draft decoding --------------------------------------------------------------------------------------------


def test_jpeg_draft_never_decodes_below_the_resize_target():
    # 1024 x 768 to a shorter side of 256: libjpeg may decode at 1/2 (512 x 384), not at 1/4 (256 x 192, whose
    # shorter side is below 256 and would have to be scaled up again).
    spec = Preprocessing(resize=256, crop=224, mean=MEAN, std=STD)
    y, x = np.mgrid[0:768, 0:1024]
    w = 2 * np.pi / 10  # detail a 256-px output keeps (5 px a period at 512) and a 192-px decode blurs
    waves = np.stack([127 + 120 * np.sin(x * w), 127 + 120 * np.sin(y * w), 127 + 120 * np.sin((x + y) * w / 1.4)],
                     axis=-1)
    data = encode(Image.fromarray(waves.astype(np.uint8)), "JPEG", quality=90)
    assert served_pixels(data, draft_size=spec.resize).size == (512, 384)
    drafted = prepare(data, spec, max_pixels=LIMIT, jpeg_draft=True)
    full = prepare(data, spec, max_pixels=LIMIT, jpeg_draft=False)
    # In 8-bit levels: about 7 on average from the 1/2 decode, about 21 from a 1/4 decode scaled back up.
    levels = np.abs(drafted - full) * np.asarray(STD, np.float32)[None, :, None, None] * 255
    assert levels.mean() < 12


# --- the trainer's normalisation -----------------------------------------------------------------------------------


def test_the_trainer_normalises_batches_as_evaluation_and_the_server_do(monkeypatch, tmp_path):
    import torch

    import train.trainer
    from train.config import config_from_options
    from train.distributed import setup

    spec = Preprocessing.imagenet(32)  # vit_c_micro's 32 px; each channel its own mean and std
    monkeypatch.setattr(train.trainer, "default_preprocessing", lambda name, size: spec)
    cfg = config_from_options({"model": "vit_c_micro", "dataset": "digits", "out": str(tmp_path / "run"),
                               "epochs": 0, "train_subset": 16, "val_subset": 16, "threads": 1, "device": "cpu",
                               "progress": False})
    trainer = train.trainer.Trainer(cfg, setup("cpu"))
    # Every level of every channel, and the coloured ramp: what train_collate gives (uint8, B x 3 x H x W, RGB).
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), (16, 16, 3))
    hwc = np.stack([levels, np.pad(ramp(16, 13), ((0, 3), (0, 0), (0, 0)))])
    got = trainer._inputs(torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()).contiguous().numpy()
    # Bitwise what evaluation (EvalCollate) and the server (image_input) feed the model, from the same pixels.
    np.testing.assert_array_equal(got, normalize(hwc, spec))
    np.testing.assert_allclose(got, np.concatenate([by_hand(a, spec.mean, spec.std) for a in hwc]), rtol=0, atol=1e-5)
