"""The preprocessing contract: defined once, saved with every checkpoint and bundle, read by the server.

Torch-free (PIL + numpy) so the serving image needs no torch. Training's evaluation path and the
server both call `preprocess`, so what a model saw at validation is exactly what it sees in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


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
    channels: int = 3
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"preprocessing needs 1 <= crop <= resize, got crop {self.crop}, resize {self.resize}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {self.mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std need 3 values with std > 0, got mean {self.mean}, std {self.std}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; unknown keys are an error."""
        return cls(**d)

    @classmethod
    def imagenet(cls, image_size: int = 224) -> Preprocessing:
        """The paper's test transform: shorter side 256/224 of the crop, centre crop, ImageNet mean/std."""
        return cls(resize=round(image_size * 256 / 224), crop=image_size)


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image (alpha, palette, 16-bit, CMYK, grey) to 8-bit `mode` ("RGB" or "L")."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels are composited onto black, the background of the embedded datasets.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode) if img.mode != mode else img


def resize_crop(img: Image.Image, spec: Preprocessing) -> Image.Image:
    """Shorter side to spec.resize, then the centred spec.crop square (PIL, antialiased)."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    size = (max(spec.resize, round(w * scale)), max(spec.resize, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, _RESAMPLE[spec.interpolation])
    left, top = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
    if (left, top) != (0, 0) or size != (spec.crop, spec.crop):
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
    return img


def to_uint8(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Decoded image -> (crop, crop, 3) uint8 in the model's colour space, before normalisation."""
    arr = np.asarray(resize_crop(to_mode(img, spec.mode), spec), dtype=np.uint8)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def normalize(batch_hwc: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised, in one vectorised pass."""
    scale = np.float32(1 / 255) / np.asarray(spec.std, np.float32)
    shift = np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)
    out = batch_hwc.astype(np.float32) * scale - shift
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def preprocess(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """PIL images -> (B, 3, crop, crop) float32 model input."""
    if not images:
        return np.zeros((0, 3, spec.crop, spec.crop), np.float32)
    return normalize(np.stack([to_uint8(img, spec) for img in images]), spec)
