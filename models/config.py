"""Typed configuration of a ViT variant: the stem and the encoder, with the paper's invariants checked."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConvLayer:
    """One conv of a convolutional stem: kernel k, stride s, output width."""

    kernel: int
    stride: int
    width: int


@dataclass(frozen=True)
class PatchifyStem:
    """ViT_P stem: one k=s=patch conv with bias."""

    patch: int

    kind = "patchify"

    @property
    def stride(self) -> int:
        return self.patch


@dataclass(frozen=True)
class ConvStem:
    """ViT_C stem: 3x3 conv-BN-ReLU layers, then a 1x1 conv with bias to the model width."""

    layers: tuple[ConvLayer, ...]

    kind = "conv"

    @property
    def stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)


Stem = PatchifyStem | ConvStem


def conv_stem(kernels: tuple[int, ...], strides: tuple[int, ...], widths: tuple[int, ...]) -> ConvStem:
    """Build a ConvStem from the three columns of the paper's stem table."""
    if not len(kernels) == len(strides) == len(widths):
        raise ValueError(
            f"conv stem columns differ in length: kernels {len(kernels)}, strides {len(strides)}, "
            f"widths {len(widths)}"
        )
    return ConvStem(tuple(ConvLayer(k, s, w) for k, s, w in zip(kernels, strides, widths, strict=True)))


@dataclass(frozen=True)
class ViTConfig:
    """One ViT variant. Invariants are checked at construction; errors say expected vs actual."""

    name: str
    stem: Stem
    depth: int
    dim: int
    mlp_dim: int
    heads: int
    patch_size: int = 16
    image_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    ln_eps: float = 1e-6
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for attr in ("depth", "dim", "mlp_dim", "heads", "patch_size", "image_size", "num_classes", "in_chans"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {attr} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(
                f"{self.name}: dim must be divisible by heads: expected dim % heads == 0, "
                f"got dim={self.dim}, heads={self.heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{self.name}: image_size must be a multiple of patch_size {self.patch_size}, "
                f"got {self.image_size}"
            )
        if self.stem.stride != self.patch_size:
            raise ValueError(
                f"{self.name}: product of stem strides must equal patch_size: expected {self.patch_size}, "
                f"got {self.stem.stride}"
            )
        if isinstance(self.stem, ConvStem):
            if not self.stem.layers:
                raise ValueError(f"{self.name}: conv stem needs at least one layer")
            last = self.stem.layers[-1]
            if last.width != self.dim:
                raise ValueError(
                    f"{self.name}: last conv stem width must equal dim: expected {self.dim}, got {last.width}"
                )
            if last.kernel != 1 or last.stride != 1:
                raise ValueError(
                    f"{self.name}: last conv stem layer must be 1x1 stride 1, "
                    f"got kernel {last.kernel} stride {last.stride}"
                )
            for layer in self.stem.layers:
                if layer.kernel < 1 or layer.stride < 1 or layer.width < 1 or layer.kernel % 2 == 0:
                    raise ValueError(f"{self.name}: invalid conv stem layer {layer} (odd kernel, positive)")

    @property
    def grid(self) -> int:
        """Tokens per side after the stem."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length including the class token."""
        return self.grid**2 + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `from_dict` inverts it."""
        d = asdict(self)
        d["stem"] = {"kind": self.stem.kind, **asdict(self.stem)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """Rebuild a config saved by `to_dict` (checkpoints, manifests)."""
        d = dict(d)
        stem = dict(d.pop("stem"))
        kind = stem.pop("kind")
        if kind == "patchify":
            d["stem"] = PatchifyStem(**stem)
        elif kind == "conv":
            d["stem"] = ConvStem(tuple(ConvLayer(**layer) for layer in stem["layers"]))
        else:
            raise ValueError(f"unknown stem kind {kind!r}: expected 'patchify' or 'conv'")
        return cls(**d)
