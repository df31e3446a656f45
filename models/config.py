"""Typed configuration of a ViT variant: the stem and the encoder, with the paper's invariants checked."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models.jsonfields import is_finite, is_int


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

    def __post_init__(self) -> None:
        # Held as a tuple: a list given here could change after ViTConfig validated it, and would make the
        # config unhashable and unequal to the same stem built from a tuple.
        if not isinstance(self.layers, list | tuple):
            raise ValueError(f"conv stem layers must be a list or tuple of ConvLayer, "
                             f"got {type(self.layers).__name__}")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)


Stem = PatchifyStem | ConvStem

# Upper bounds, checked before any tensor is sized from a config (checkpoints and bundle manifests are untrusted
# input). Far above every registered variant; MAX_IMAGE_SIDE and MAX_CLASSES bound a bundle's manifest too
# (models.bundle imports them).
MAX_DEPTH = 256
MAX_DIM = 16384
MAX_MLP_DIM = 65536
MAX_IMAGE_SIDE = 4096
MAX_RESIZE = 2 * MAX_IMAGE_SIDE  # ImageNet's resize is 8/7 of the crop; resizing never allocates beyond the crop
MAX_CLASSES = 100_000
# Lower bounds beyond 1, for values with which no model could ever be served: one class is one logit, which gives
# nothing to rank (training refuses a dataset of one class by the same bound, and export could never certify it);
# LayerNorm over a single feature outputs its bias whatever its input, so with dim 1 every image gets the same logits.
MIN_CLASSES = 2
MIN_DIM = 2
# The channels every model takes: what preprocessing makes of every image (grey data, mode "L", is replicated to 3),
# so the only count a checkpoint or bundle can hold (models.preprocessing imports it).
IN_CHANS = 3
MAX_STEM_LAYERS = 16
MAX_STEM_KERNEL = 15
MAX_NAME_CHARS = 200
MAX_LABEL_CHARS = 1024  # a class name, tensor name, runtime or precision: a label, never a document
MAX_PARAMS = 2**32  # 16 GiB of float32 weights; the paper's largest variant (vit_p_72gf) has 353 M
# The largest single tensor per image (one layer's attention scores, or one stem conv's output): 8 GiB of float32.
# A bound on the peak, not on the sum over layers, so big models at big sizes still build where memory allows them
# (vit_p_18gf at 1024: 201 M attention scores); a hostile size (patch 4 at 4096: 10^12) is refused.
MAX_ACTIVATIONS = 2**31
# The highest a decoded-image pixel limit may be set to (the server's and serve.tensor's --max-image-pixels): 3 GB
# decoded as RGB. Its default is models.preprocessing.DEFAULT_MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 1_000_000_000
# C0, DEL, C1, line and paragraph separators, lone surrogates: labels go into one-line messages, labels.txt and
# JSON answers (which cannot encode a lone surrogate).
_NOT_IN_LABELS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_INT_BOUNDS = {"depth": MAX_DEPTH, "dim": MAX_DIM, "mlp_dim": MAX_MLP_DIM, "heads": MAX_DIM,
               "patch_size": MAX_IMAGE_SIDE, "image_size": MAX_IMAGE_SIDE, "num_classes": MAX_CLASSES}
# What makes a positive value unservable, said with the bound.
_LOW_BOUNDS = {
    "num_classes": (MIN_CLASSES, "one class leaves nothing to classify (a single logit ranks nothing; training needs "
                                 "2 classes too)"),
    "dim": (MIN_DIM, "LayerNorm over one feature outputs its bias for every input, so every image would get the same "
                     "logits"),
}


def is_label(value: object, max_chars: int = MAX_LABEL_CHARS) -> bool:
    """Whether `value` is a string of 1..max_chars without control characters, line breaks or lone surrogates."""
    return isinstance(value, str) and 0 < len(value) <= max_chars and _NOT_IN_LABELS.search(value) is None


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
        if not is_label(self.name, MAX_NAME_CHARS):
            raise ValueError(f"config name must be a string of 1..{MAX_NAME_CHARS} characters without control "
                             f"characters, got {self.name!r:.80}")
        if not isinstance(self.description, str):
            raise ValueError(f"{self.name}: description must be a string, got {type(self.description).__name__}")
        for attr, high in _INT_BOUNDS.items():
            value = getattr(self, attr)
            if not is_int(value, numpy=True) or value < 1:
                raise ValueError(f"{self.name}: {attr} must be a positive integer, got {value!r:.80}")
            if value > high:
                raise ValueError(f"{self.name}: {attr} must be at most {high}, got {value}")
            if (low := _LOW_BOUNDS.get(attr)) and value < low[0]:
                raise ValueError(f"{self.name}: {attr} must be at least {low[0]}, got {value}: {low[1]}")
            object.__setattr__(self, attr, int(value))  # a numpy integer (a size from an array) held as int: JSON-ready
        if not is_int(self.in_chans, numpy=True) or self.in_chans != IN_CHANS:
            raise ValueError(f"{self.name}: in_chans must be {IN_CHANS}, got {self.in_chans!r:.80}: preprocessing "
                             f"gives every model {IN_CHANS} channels (grey data is read as mode \"L\" and "
                             f"replicated to {IN_CHANS}, so a grey model takes {IN_CHANS} channels too)")
        object.__setattr__(self, "in_chans", int(self.in_chans))
        eps = self.ln_eps
        # is_finite: an int too large for a float (a 400-digit JSON number) is not finite, never an OverflowError.
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (is_finite(eps) and 0 < eps <= 1):
            raise ValueError(f"{self.name}: ln_eps must be a finite number in (0, 1], got {eps!r:.80}")
        if self.dim % self.heads:
            raise ValueError(
                f"{self.name}: dim must be divisible by heads: expected dim % heads == 0, "
                f"got dim={self.dim}, heads={self.heads}"
            )
        if self.patch_size > self.image_size or self.image_size % self.patch_size:
            raise ValueError(
                f"{self.name}: image_size must be a multiple of patch_size {self.patch_size}, "
                f"got {self.image_size}"
            )
        self._check_stem()
        self._check_size()

    def _check_stem(self) -> None:
        """The stem's own fields, then how it fits the encoder (stride product, last width)."""
        if isinstance(self.stem, PatchifyStem):
            if not is_int(self.stem.patch) or self.stem.patch < 1:
                raise ValueError(f"{self.name}: patchify stem patch must be a positive integer, "
                                 f"got {self.stem.patch!r:.80}")
        elif isinstance(self.stem, ConvStem):
            _check_conv_layers(self.name, self.stem)
        else:
            raise ValueError(f"{self.name}: stem must be a PatchifyStem or a ConvStem, got {type(self.stem).__name__}")
        if self.stem.stride != self.patch_size:
            raise ValueError(
                f"{self.name}: product of stem strides must equal patch_size: expected {self.patch_size}, "
                f"got {self.stem.stride}"
            )
        if isinstance(self.stem, ConvStem):
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

    def _check_size(self) -> None:
        """Weights and the largest activation per image, bounded before anything allocates for this model."""
        if (weights := self.weight_estimate()) > MAX_PARAMS:
            raise ValueError(f"{self.name}: about {weights:,} parameters is more than the {MAX_PARAMS:,} allowed")
        if (peak := self.peak_activations()) > MAX_ACTIVATIONS:
            raise ValueError(f"{self.name}: its largest tensor per image holds {peak:,} values, more than the "
                             f"{MAX_ACTIVATIONS:,} allowed (image_size {self.image_size}, patch {self.patch_size})")

    def weight_estimate(self) -> int:
        """The weight matrices' size (blocks, stem, position embedding, head), within a few per cent of the exact
        count in models.complexity, which needs a finished config and so cannot be asked from here."""
        d = self.dim
        blocks = self.depth * (4 * d * d + 2 * d * self.mlp_dim)
        if self.stem.kind == "conv":
            widths = [self.in_chans, *(layer.width for layer in self.stem.layers)]
            stem = sum(layer.kernel**2 * cin * cout
                       for layer, cin, cout in zip(self.stem.layers, widths[:-1], widths[1:], strict=True))
        else:
            stem = self.patch_size**2 * self.in_chans * d
        return blocks + stem + self.num_tokens * d + d * self.num_classes

    def peak_activations(self) -> int:
        """Values in the largest single activation per image: one layer's attention scores, token or MLP
        activations, or one stem conv's output."""
        peaks = [self.heads * self.num_tokens**2, self.num_tokens * max(self.dim, self.mlp_dim)]
        if self.stem.kind == "conv":
            side = self.image_size
            for layer in self.stem.layers:
                side = -(-side // layer.stride)
                peaks.append(side * side * layer.width)
        return max(peaks)

    @property
    def grid(self) -> int:
        """Tokens per side after the stem."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length including the class token."""
        return self.grid**2 + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `from_dict` inverts it."""
        d = asdict(self)
        d["stem"] = {"kind": self.stem.kind, **asdict(self.stem)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """Rebuild a config saved by `to_dict` (checkpoints, manifests); ValueError names what is wrong, a missing key
        by its name (`require_keys`): never a default standing in for it."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be an object, got {type(d).__name__}")
        require_keys(d, cls, "config")
        d = dict(d)
        stem = d.pop("stem")
        if not isinstance(stem, dict):
            raise ValueError(f"config.stem must be an object, got {type(stem).__name__}")
        stem = dict(stem)
        if "kind" not in stem:
            raise ValueError(f"config.stem is missing kind{_ALWAYS_WRITTEN}")
        kind = stem.pop("kind")
        try:
            if kind == "patchify":
                require_keys(stem, PatchifyStem, "config.stem")
                d["stem"] = PatchifyStem(**stem)
            elif kind == "conv":
                d["stem"] = ConvStem(_conv_layers(stem))
            else:
                raise ValueError(f"unknown stem kind {kind!r:.80}: expected 'patchify' or 'conv'")
            return cls(**d)
        except TypeError as exc:  # an unknown key: the constructor names it
            raise ValueError(f"config: {exc}") from None


# Every vitc release, from the first (28b03b3, ee277b8 for train/export/serve), wrote every field of a config, its
# stem and its conv layers (`to_dict` is dataclasses.asdict): a key missing from a file is an edit or another tool's
# file, never an older vitc's, so none takes its dataclass default. A field a later release adds may keep a default
# only for files whose format_version predates it.
_ALWAYS_WRITTEN = ": every vitc writes it, so the file was edited or not written by vitc"


def require_keys(d: dict[str, Any], cls: type, where: str) -> None:
    """ValueError ("config is missing patch_size: ...") unless `d` holds every field of the dataclass `cls`."""
    if missing := [f.name for f in fields(cls) if f.init and f.name not in d]:
        raise ValueError(f"{where} is missing {', '.join(missing)}{_ALWAYS_WRITTEN}")


def _conv_layers(stem: dict[str, Any]) -> tuple[ConvLayer, ...]:
    """The layers of a serialised conv stem, bounded in number before any is built."""
    if "layers" not in stem:
        raise ValueError(f"config.stem is missing layers{_ALWAYS_WRITTEN}")
    layers = stem.pop("layers")
    if stem:
        raise ValueError(f"config.stem has unknown keys {sorted(stem)[:5]}")
    if not isinstance(layers, list | tuple) or not 1 <= len(layers) <= MAX_STEM_LAYERS:
        raise ValueError(f"config.stem.layers must be a list of 1..{MAX_STEM_LAYERS} layers")
    if not all(isinstance(layer, dict) for layer in layers):
        raise ValueError("config.stem.layers must hold objects {kernel, stride, width}")
    for i, layer in enumerate(layers):
        require_keys(layer, ConvLayer, f"config.stem.layers[{i}]")
    return tuple(ConvLayer(**layer) for layer in layers)


def _check_conv_layers(name: str, stem: ConvStem) -> None:
    """Each conv layer: positive odd kernel, positive stride, width bounded like dim."""
    if not 1 <= len(stem.layers) <= MAX_STEM_LAYERS:
        raise ValueError(f"{name}: conv stem needs 1..{MAX_STEM_LAYERS} layers, got {len(stem.layers)}")
    for layer in stem.layers:
        if not isinstance(layer, ConvLayer) or not all(
                is_int(v) and v >= 1 for v in (layer.kernel, layer.stride, layer.width)):
            raise ValueError(f"{name}: invalid conv stem layer {layer!r:.120} (positive integers)")
        if layer.kernel % 2 == 0 or layer.kernel > MAX_STEM_KERNEL:
            raise ValueError(f"{name}: invalid conv stem layer {layer} (odd kernel up to {MAX_STEM_KERNEL})")
        if layer.stride > MAX_IMAGE_SIDE or layer.width > MAX_DIM:
            raise ValueError(f"{name}: invalid conv stem layer {layer} (stride up to {MAX_IMAGE_SIDE}, "
                             f"width up to {MAX_DIM})")
