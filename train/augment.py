"""Training augmentation from torchvision transforms v2: crops, flips, AutoAugment, mixup/CutMix.

Randomness is a pure function of (seed, epoch, image index) per sample and (seed, epoch, step, rank) per
batch, so data order and augmentation do not depend on worker count, rank scheduling or where a run was
resumed: a killed-and-resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torchvision.transforms import v2


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


def train_transform(augment: str, size: int, crop_scale: float, hflip: float, pil_input: bool) -> Callable:
    """uint8 CHW tensor (or PIL image) -> augmented uint8 (3, size, size) tensor.

    none: resize + centre crop; light: random-resized crop + flip; autoaugment: light + AutoAugment (ImageNet).
    """
    if augment == "none":
        ops: list[Callable] = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    else:
        ops = [v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if augment == "autoaugment":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    if pil_input:
        ops.append(v2.PILToTensor())
    return v2.Compose(ops)


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
