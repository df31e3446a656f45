"""The table of variants (the paper's ten plus small pairs for 32x32 images) and the model builder."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from models.config import PatchifyStem, ViTConfig, conv_stem

if TYPE_CHECKING:
    import torch.nn as nn

_VARIANTS: dict[str, ViTConfig] = {}


class UnknownVariant(ValueError, KeyError):
    """A model name that is not registered. A ValueError like every other bad argument; also a KeyError, which
    callers caught before."""

    def __str__(self) -> str:  # the message as given (KeyError's str would quote it)
        return str(self.args[0]) if self.args else ""


def register(cfg: ViTConfig) -> ViTConfig:
    """Add a variant to the table; a duplicate name is an error."""
    if not isinstance(cfg, ViTConfig):  # a name failed with "'str' object has no attribute 'name'"
        raise TypeError(f"register takes a models.ViTConfig, got {type(cfg).__name__}")
    if cfg.name in _VARIANTS:
        raise ValueError(f"variant {cfg.name!r} is already registered")
    _VARIANTS[cfg.name] = cfg
    return cfg


def _pair(size: str, depth: int, dim: int, mlp: int, heads: int,
          stem_cols: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], **kw: Any) -> None:
    """Register ViT_P-<size> and ViT_C-<size>: the conv twin has one block fewer."""
    register(ViTConfig(f"vit_p_{size}", PatchifyStem(kw.get("patch_size", 16)), depth, dim, mlp, heads, **kw))
    register(ViTConfig(f"vit_c_{size}", conv_stem(*stem_cols), depth - 1, dim, mlp, heads, **kw))


# The paper's table (224x224, patch 16); stems from its conv-stem table.
_pair("1gf", 12, 192, 576, 3, ((3, 3, 3, 3, 1), (2, 2, 2, 2, 1), (24, 48, 96, 192, 192)))
_pair("4gf", 12, 384, 1152, 6, ((3, 3, 3, 3, 1), (2, 2, 2, 2, 1), (48, 96, 192, 384, 384)))
_pair(
    "18gf", 12, 768, 3072, 12,
    ((3, 3, 3, 3, 3, 3, 1), (2, 2, 1, 2, 1, 2, 1), (64, 128, 128, 256, 256, 512, 768)),
)
_pair(
    "36gf", 14, 1024, 4096, 16,
    ((3, 3, 3, 3, 3, 3, 1), (2, 2, 1, 2, 1, 2, 1), (64, 128, 128, 256, 256, 512, 1024)),
)
_pair(
    "72gf", 22, 1152, 4608, 18,
    ((3,) * 8 + (1,), (2, 2, 1, 2, 1, 1, 2, 1, 1), (64, 128, 128, 256, 256, 256, 512, 512, 1152)),
)
# 32x32 images, patch 4: two stride-2 3x3 convs + 1x1. Sized to train in minutes on 2 CPU cores, at flops parity
# (C/P 1.009): the stem widths 3d/4, 3d/2, d (nano's pattern) pay for the block ViT_C drops. The full paper study's
# pair and the demo's.
_pair(
    "mini", 7, 128, 384, 4, ((3, 3, 1), (2, 2, 1), (96, 192, 128)),
    patch_size=4, image_size=32, num_classes=10,
)
# A few-thousand-parameter pair for fast tests (not for accuracy); its ViT_C has 17 % fewer flops than its ViT_P.
_pair(
    "micro", 3, 32, 64, 2, ((3, 3, 1), (2, 2, 1), (16, 32, 32)),
    patch_size=4, image_size=32, num_classes=10,
)
# micro's size at flops parity (C/P 1.007): a wider stem pays for the block ViT_C drops. The reduced paper study's
# pair.
_pair(
    "nano", 3, 32, 64, 2, ((3, 3, 1), (2, 2, 1), (24, 48, 32)),
    patch_size=4, image_size=32, num_classes=10,
)

PAPER_VARIANTS: tuple[str, ...] = tuple(
    f"vit_{s}_{g}" for g in ("1gf", "4gf", "18gf", "36gf", "72gf") for s in ("p", "c")
)


def list_variants() -> list[str]:
    """Names of all registered variants, in table order."""
    return list(_VARIANTS)


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The variant's config, with fields overridden (e.g. num_classes, image_size); re-validated."""
    if not isinstance(name, str) or name not in _VARIANTS:
        raise UnknownVariant(f"unknown model {name!r:.80}; known: {', '.join(_VARIANTS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(_VARIANTS[name], **overrides)
    except TypeError as exc:
        fields = ", ".join(f.name for f in dataclasses.fields(ViTConfig))
        raise ValueError(f"{name}: bad override ({exc}); fields: {fields}") from None


def build_model(name: str, *, num_classes: int | None = None, image_size: int | None = None,
                **overrides: Any) -> nn.Module:
    """Build a freshly initialised torch model for a registered variant."""
    from models.vit import VisionTransformer

    return VisionTransformer(get_config(name, num_classes=num_classes, image_size=image_size, **overrides))
