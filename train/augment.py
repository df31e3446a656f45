"""Training augmentation from torchvision transforms v2: crops, flips, AutoAugment, mixup/CutMix.

Randomness is a pure function of (seed, epoch, image index) per sample and (seed, epoch, step, rank) per
batch, so data order and augmentation do not depend on worker count, rank scheduling or where a run was
resumed: a killed-and-resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.transforms import v2

from models.preprocessing import Preprocessing, to_uint8

if TYPE_CHECKING:
    from PIL import Image


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU generator seeded to `seed`, restoring its previous state afterwards."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


class EvalView:
    """PIL image -> its evaluation view, `models.preprocessing.to_uint8` (shorter side to `spec.resize`, then the
    centred `spec.crop` square, in the model's colour space), as an RGB PIL image; a class, so workers can pickle it."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import Image

        return Image.fromarray(to_uint8(img, self.spec))


def train_transform(augment: str, spec: Preprocessing, crop_scale: float, hflip: float, pil_input: bool) -> Callable:
    """uint8 CHW tensor (or PIL image) -> augmented uint8 (3, spec.crop, spec.crop) tensor.

    none: resize + centre crop, the evaluation view itself (flipped only for an `hflip` above 0: the run's default
    for none is 0, `train.config.resolve_config`); light: random-resized crop + flip; autoaugment: light +
    AutoAugment (ImageNet). A tensor is an embedded set's image, already decoded to the evaluation view (`predecode`).
    """
    if augment == "none":
        # The very function evaluation, export parity and the server run: a folder's resize is 8/7 of the crop
        # (`Preprocessing.imagenet`), and resizing to the crop itself would train on another scale than is served.
        ops: list[Callable] = [EvalView(spec)] if pil_input else []
    else:
        ops = [v2.RandomResizedCrop(spec.crop, scale=(crop_scale, 1.0), antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if augment == "autoaugment":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    if pil_input:
        ops.append(v2.PILToTensor())
    return v2.Compose(ops or [v2.Identity()])


class BatchMixer:
    """Mixup / CutMix on a normalised batch: int labels -> (images, soft targets), or unchanged when off."""

    def __init__(self, mixup: float, cutmix: float, prob: float, num_classes: int) -> None:
        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.prob = prob
        # With both on, one of the two per batch with p 0.5 (the paper's switch probability).
        self.mix = None if not choices or prob == 0 else choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    @property
    def enabled(self) -> bool:
        return self.mix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix with probability `prob`; the choice and the mixing coefficients come from `seed`."""
        if self.mix is None:
            return images, labels
        with seeded(seed):
            if self.prob < 1.0 and float(torch.rand(())) >= self.prob:
                return images, labels
            return self.mix(images, labels)
