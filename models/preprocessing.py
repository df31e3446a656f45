"""The preprocessing contract: defined once, saved with every checkpoint and bundle, read by the server.

Torch-free (PIL + numpy) so the serving image needs no torch; PIL is imported where images are handled, so that
the contract itself (read by every command, before it can say which extra is missing) needs numpy only.
Training's evaluation path and the server both call `preprocess`, so what a model saw at validation is exactly
what it sees in production.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from models.config import IN_CHANS, MAX_IMAGE_SIDE, MAX_RESIZE

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The image formats every reader opens (the server, dataset folders for training, evaluation and export parity,
# serve.tensor): Pillow's other plugins (PPM, TGA, ICO, JPEG 2000, ...) are never reached, whatever a file is
# called, so what trains and evaluates is exactly what can be served.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# The most pixels one image may have, from its header, before any is decoded: the server's --max-image-pixels
# default (serve.tensor's too) and the bound of every dataset reader, so what trains and evaluates can be served.
# Below Pillow's own bomb bound (a warning above 89.5 M pixels, an error above 179 M).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# PNG metadata is inflated while a file is opened, before any pixel: Pillow reads every tEXt/zTXt/iTXt chunk into
# `info` (up to 64 MiB of text an image by default: a 63 KB PNG of zTXt chunks cost 63 MB and 130 ms) and inflates
# each iCCP colour profile. vitc reads neither, so the text is bounded to what real files carry (XMP, an AI tool's
# workflow JSON: a few KB to a few hundred), and one chunk keeps Pillow's own 1 MiB, which is also the largest ICC
# profile it inflates: an image's text costs at most 3 MiB inflated (the chunk that crosses the total included),
# about 4 ms. A PNG past either bound is refused (a 400, and unreadable to training and evaluation, which count it):
# Pillow cannot drop the text and keep the image without also accepting truncated files. Every reader calls
# `image_formats` before it opens an image, so every one applies the same bounds.
PNG_TEXT_CHUNK_BYTES = 1 << 20  # one zTXt/iTXt chunk's inflated text or one iCCP profile (Pillow's MAX_TEXT_CHUNK)
PNG_TEXT_BYTES = 2 << 20  # all of one image's text (Pillow's MAX_TEXT_MEMORY)
MAX_IMAGE_FILE_BYTES = 1 << 30  # the largest encoded image anything reads whole (the server's body-size ceiling)
_RESAMPLE = ("bilinear", "bicubic", "nearest")  # PIL's Image.Resampling members, lower-case
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "nearest": 0.5}  # each filter's reach, in output pixels
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Pixels are scaled to [0, 1] before normalisation, so real stds are about 0.1..1 (ImageNet's 0.225). A std below
# 1e-6 is a mistake, refused by name: one 8-bit step would span thousands of units, and nearer 0 float32 gives up
# (1/std overflows below about 3e-39, so std=1e-40 makes inf; std=1e-300 rounds to 0). Past this bound, mean/std
# can still overflow (mean 3e38, std 0.5): the normalisation table itself must come out finite.
MIN_STD = 1e-6


def image_formats() -> tuple[str, ...]:
    """The `IMAGE_FORMATS` this Pillow build can open (AVIF needs a recent one), for `Image.open(formats=...)`;
    Pillow's PNG metadata bounds set first (`_bound_png_metadata`)."""
    from PIL import Image

    _bound_png_metadata()
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


@functools.cache
def _bound_png_metadata() -> None:
    """Set Pillow's process-wide PNG text bounds to vitc's, once."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = PNG_TEXT_CHUNK_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize`, centre-crop `crop`, scale to [0, 1], normalise, to CHW float32.

    `mode` is the colour space the model was trained in: "RGB", or "L" for grey data (replicated to 3
    channels, so colour inputs are converted to grey first, as the training images were).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    mode: str = "RGB"
    channels: int = IN_CHANS
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        # Checkpoints and manifests are untrusted: every size is bounded before an image is resized to it.
        for attr, low, high in (("crop", 1, MAX_IMAGE_SIDE), ("resize", self.crop, MAX_RESIZE)):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
                raise ValueError(f"preprocessing needs 1 <= crop <= resize, integers, crop at most {MAX_IMAGE_SIDE}, "
                                 f"resize at most {MAX_RESIZE}; got crop {self.crop!r:.40}, resize {self.resize!r:.40}")
            object.__setattr__(self, attr, int(value))
        if not isinstance(self.interpolation, str) or self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r:.40}")
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {self.mode!r:.40}")
        # What `preprocess` makes, and what every ViTConfig takes.
        if type(self.channels) is not int or self.channels != IN_CHANS or self.layout != "NCHW":
            raise ValueError(f"channels and layout must be {IN_CHANS} and 'NCHW', got {self.channels!r:.40} and "
                             f"{self.layout!r:.40}")
        mean, std = _three_numbers("mean", self.mean), _three_numbers("std", self.std)
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        if min(std) < MIN_STD:
            raise ValueError(f"std must be at least {MIN_STD:g}, got {std}")
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            finite = np.isfinite(_lookup(mean, std)).all()  # the float32 arithmetic every input goes through
        if not finite:
            raise ValueError(f"mean {mean} and std {std} normalise pixel values beyond float32's range")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict` (checkpoints, manifests); ValueError names an unknown or missing key.

        Every key is required: every vitc release, from the first (28b03b3; ee277b8 for train, export and serve),
        wrote all eight (`to_dict` is dataclasses.asdict), in checkpoint.json and manifest.json alike, so a missing
        one is an edited or foreign file, and its default (ImageNet's mean and std, RGB) would normalise every input
        wrongly without a word. A key a later release adds may keep a default only for files whose format_version
        predates it."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        if unknown := sorted(str(k)[:40] for k in d.keys() - names):
            raise ValueError(f"preprocessing has unknown keys {unknown[:5]}")
        # Those without a default first, sorted, as this message has always named them; then the others in order.
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in d)
        missing += [f.name for f in fields(cls) if f.default is not MISSING and f.name not in d]
        if missing:
            raise ValueError(f"preprocessing is missing {', '.join(missing)}: every vitc writes all its keys, so the "
                             f"file was edited or not written by vitc")
        return cls(**d)

    @classmethod
    def imagenet(cls, image_size: int = 224) -> Preprocessing:
        """The paper's test transform: shorter side 256/224 of the crop, centre crop, ImageNet mean/std."""
        return cls(resize=round(image_size * 256 / 224), crop=image_size)


def _three_numbers(name: str, values: Any) -> tuple[float, float, float]:
    """Three real numbers finite in float32 (normalisation's arithmetic), as floats, from a list, tuple or 1-D
    array: a set has no channel order, and the string "nan" or a bool is not a number."""
    ordered = isinstance(values, list | tuple) or (isinstance(values, np.ndarray) and values.ndim == 1)
    if not ordered or len(values) != 3:
        raise ValueError(f"{name} must hold 3 finite numbers (a list, one per channel), got {values!r:.80}")
    a, b, c = values
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
               and abs(v) <= _FLOAT32_MAX for v in (a, b, c)):
        raise ValueError(f"{name} must hold 3 finite numbers (within float32's range), got {values!r:.80}")
    return float(a), float(b), float(c)


def _grey_to_8bit(img: Image.Image, key: int | None = None) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit "L", a band of rows at a time (temporaries stay ~1 M pixels).

    The scale follows the mode, never the pixel values (one bright pixel must not darken the whole image):
    integers are 16-bit data, 0..65535 (32-bit "I" images hold them in practice), floats are 0..1; what lies
    outside is clipped. Pixels of the transparent value `key` (a 16-bit PNG's colour key, compared at full depth)
    come out black, as transparency composited onto black does.
    """
    w, h = img.size
    scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
    out = np.empty((h, w), np.uint8)
    rows = max(1, (1 << 20) // max(1, w))
    for y in range(0, h, rows):
        raw = np.asarray(img.crop((0, y, w, min(h, y + rows))))
        band = raw.astype(np.float32)
        if img.mode == "F" and not np.isfinite(band).all():  # NaN has no 8-bit value (the cast is undefined)
            raise ValueError("the image has non-finite pixel values (NaN or infinity)")
        out[y:y + rows] = np.clip(band * np.float32(scale), 0, 255).round()
        if key is not None:
            out[y:y + rows][raw == key] = 0
    from PIL import Image

    return Image.fromarray(out, "L")


_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # `_grey_to_8bit` brings these to 8 bits


def _colour_key(img: Image.Image) -> int | tuple[int, int, int] | None:
    """The one colour a grey or RGB image marks transparent (a PNG tRNS colour key, a grey GIF's transparent index),
    in its pixels' own values; None when it has none (a palette's transparency is the palette's own business).
    `models.decoding`, which every reader decodes through, puts a PNG's key in those terms where Pillow does not: it
    scales a 2- or 4-bit grey key to 8 bits, and turns a 48-bit RGB key, matched at full depth, into alpha."""
    key = img.info.get("transparency")
    if img.mode == "RGB" and isinstance(key, tuple) and len(key) == 3 and all(type(k) is int for k in key):
        return key
    if img.mode in ("1", "L", *_WIDE_GREY) and img.mode != "F" and type(key) is int:
        return key
    return None


_NONZERO = bytes([0] + [255] * 255)  # a lookup table: 0 stays 0, anything else 255


def _key_to_black(img: Image.Image, key: int | tuple[int, int, int]) -> Image.Image:
    """A grey ("1", "L") or "RGB" image with the pixels of its transparent colour black: bitwise what compositing
    the same picture, given as an alpha channel, onto black gives. A copy, made by Pillow's per-pixel operations
    (a lookup table, min/max): a grey image in one pass, an RGB one a band of rows at a time (temporaries stay
    ~1 M pixels). `to_mode` calls it on the source crop only, the pixels preprocessing reads."""
    if img.mode == "1":
        img = img.convert("L")  # 0 or 255, as Pillow gives a 1-bit PNG's key
    keys = key if isinstance(key, tuple) else (key,)
    if not all(0 <= k <= 255 for k in keys):  # no 8-bit pixel has it
        return img
    if img.mode == "L":
        return img.point([0 if i == key else i for i in range(256)])
    from PIL import Image, ImageChops

    misses = [0 if i == k else 255 for k in keys for i in range(256)]  # per channel: 0 where it is the key's value
    w, h = img.size
    out = Image.new("RGB", (w, h))
    out.info.update(img.info)
    rows = max(1, (1 << 20) // max(1, w))
    for y in range(0, h, rows):
        band = img.crop((0, y, w, min(h, y + rows)))
        # Grey is 0 only where all three channels are (each 0 or 255), the key's pixels: `keep` is 0 there, 255
        # elsewhere, and the darker of a pixel and `keep` is black there and the pixel itself elsewhere.
        keep = band.point(misses).convert("L").point(_NONZERO)
        out.paste(ImageChops.darker(band, Image.merge("RGB", (keep, keep, keep))), (0, y))
    return out


_ORIENTATION = 0x0112  # EXIF tag


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (training, evaluation, export checks and
    the server all decode through this). No orientation, or a broken EXIF block: the image itself, not a copy."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a hostile or broken EXIF block must not cost the image
        return img
    if orientation not in range(2, 9):
        return img
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


# Modes `to_mode` converts itself; `plain_mode` brings the others (CMYK, YCbCr, LAB, HSV) to RGB first.
NATIVE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I", "F", "I;16", "I;16B", "I;16L",
                          "I;16N"})


def plain_mode(img: Image.Image) -> Image.Image:
    """`img` in a mode `to_mode` takes: exotic colour modes converted to RGB (ValueError when Pillow cannot). Every
    decoder (training, evaluation, the server) calls it, so a YCbCr TIFF reaches a grey model the same way."""
    return img if img.mode in NATIVE_MODES else img.convert("RGB")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image (alpha, palette, colour key, 16-bit, CMYK, grey) to 8-bit `mode` ("RGB" or "L").

    Every kind of transparency is composited onto black: an alpha channel, a palette's, and a grey or RGB image's
    transparent colour (the tRNS colour key PNG optimisers write instead of an alpha channel when that is lossless),
    so one picture gets one answer however it is encoded."""
    key = _colour_key(img)
    if img.mode in _WIDE_GREY:
        img = _grey_to_8bit(img, key)
    elif key is not None:
        img = _key_to_black(img, key)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels are composited onto black, the background of the embedded datasets. Pasting through
        # the alpha band gives bitwise what Image.alpha_composite over opaque black gives, with one copy fewer.
        from PIL import Image

        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (0, 0, 0))
        img.paste(rgba, (0, 0), rgba)
    return img.convert(mode) if img.mode != mode else img


def _geometry(width: int, height: int, spec: Preprocessing) -> tuple[tuple[float, float, float, float], bool]:
    """The source box that "shorter side to resize, then the centred crop" maps onto the output, and whether that
    scales (False: a plain crop). Computed from the sizes alone, so no step ever holds the resized full image."""
    scale = spec.resize / min(width, height)
    rw, rh = max(spec.resize, round(width * scale)), max(spec.resize, round(height * scale))
    left, top = (rw - spec.crop) // 2, (rh - spec.crop) // 2
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + spec.crop) * sx, (top + spec.crop) * sy), (rw, rh) != (width, height)


@dataclass(frozen=True)
class _SourceCrop:
    image: Image.Image  # the part of the source the output depends on
    box: tuple[float, float, float, float]  # the output's footprint within `image`
    scaled: bool


def _cut(width: int, height: int, spec: Preprocessing) -> tuple[tuple[int, int, int, int], tuple[float, ...], bool]:
    """(the source region the output depends on, the output's footprint within it, whether that scales)."""
    box, scaled = _geometry(width, height, spec)
    if not scaled:  # integer box: the output is exactly these pixels
        return tuple(int(v) for v in box), (0, 0, spec.crop, spec.crop), False
    # Keep the filter's full reach around the box, so edge pixels weigh exactly as in a whole-image resize.
    reach = _SUPPORT[spec.interpolation] * max(1.0, (box[2] - box[0]) / spec.crop) + 2
    x0, y0 = max(0, math.floor(box[0] - reach)), max(0, math.floor(box[1] - reach))
    x1, y1 = min(width, math.ceil(box[2] + reach)), min(height, math.ceil(box[3] + reach))
    return (x0, y0, x1, y1), (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0), True


def copied_pixels(width: int, height: int, spec: Preprocessing) -> int:
    """Pixels of the source that preprocessing copies beside the decoded image (its region, when that is not the
    whole image: a 6000 x 4000 photo's centre square), for the decode budget."""
    (x0, y0, x1, y1), _, _ = _cut(width, height, spec)
    return 0 if (x0, y0, x1, y1) == (0, 0, width, height) else (x1 - x0) * (y1 - y0)


def _source_crop(img: Image.Image, spec: Preprocessing) -> _SourceCrop:
    """Cut the source down to the pixels the output depends on, before any conversion copies it whole."""
    w, h = img.size
    region, box, scaled = _cut(w, h, spec)
    return _SourceCrop(img.crop(region) if region != (0, 0, w, h) else img, box, scaled)


def to_uint8(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Decoded image -> (crop, crop, 3) uint8 in the model's colour space, before normalisation.

    Shorter side to spec.resize, then the centred spec.crop square (PIL, antialiased), computed on the crop's
    footprint only: the cost is bounded by the crop whatever the aspect ratio (a 2 x 1,000,000 strip costs what a
    small square does). PIL's filter weights then start from another origin than in a whole-image resize: with
    bilinear (the default) the output matches resizing the whole image and then cropping it within one level on a
    few pixels; bicubic can differ by several levels on a few high-contrast pixels, and nearest picks the other
    neighbour where a pixel's centre falls exactly between two source pixels (a sampling tie). Training, evaluation,
    export's parity and the server all compute it this same way, so they agree exactly.
    """
    arr = _pixels(img, spec)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def _pixels(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """(crop, crop) for a one-channel model colour space, else (crop, crop, 3), uint8 (see `to_uint8`)."""
    source = _source_crop(img, spec)
    region = to_mode(source.image, spec.mode)
    if source.scaled:
        from PIL import Image

        filter_ = Image.Resampling[spec.interpolation.upper()]
        region = region.resize((spec.crop, spec.crop), filter_, box=source.box)
    return np.asarray(region, dtype=np.uint8)


def image_input(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """One decoded image -> (1, 3, crop, crop) float32, bitwise `preprocess([img], spec)`; a grey image is looked
    up once, not copied into three channels first (the server's per-request path)."""
    arr = _pixels(img, spec)
    if arr.ndim == 3:
        return normalize(arr[None], spec)
    table = _lookup(spec.mean, spec.std)
    out = np.empty((1, 3, *arr.shape), np.float32)
    np.take(table[0], arr, out=out[0, 0], mode="clip")
    for k in (1, 2):
        if (spec.mean[k], spec.std[k]) == (spec.mean[0], spec.std[0]):  # same normalisation: same values
            out[0, k] = out[0, 0]
        else:
            np.take(table[k], arr, out=out[0, k], mode="clip")
    return out


@functools.lru_cache(maxsize=64)
def affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float32 per channel: a uint8 value x normalises to x * scale - shift (training's batches too)."""
    std32 = np.asarray(std, np.float32)
    return np.float32(1 / 255) / std32, np.asarray(mean, np.float32) / std32


def _lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: every uint8 value of each channel, normalised (the same float32 arithmetic as
    `x * scale - shift` of `affine` on the whole image, so the values are bitwise those of that formula)."""
    scale, shift = affine(mean, std)
    table = np.arange(256, dtype=np.float32)[None, :] * scale[:, None] - shift[:, None]
    table.setflags(write=False)
    return table


def normalize(batch_hwc: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised: one table lookup per value, written planar."""
    table = _lookup(spec.mean, spec.std)
    b, h, w, c = batch_hwc.shape
    out = np.empty((b, c, h, w), np.float32)
    for k in range(c):
        np.take(table[k], batch_hwc[..., k], out=out[:, k], mode="clip")  # uint8 indices are always in range
    return out


def preprocess(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """PIL images -> (B, 3, crop, crop) float32 model input."""
    if not images:
        return np.zeros((0, 3, spec.crop, spec.crop), np.float32)
    return normalize(np.stack([to_uint8(img, spec) for img in images]), spec)
