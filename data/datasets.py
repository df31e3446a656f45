"""Datasets: the embedded sets (animals, mnist, digits) and ImageNet-layout folders, as labelled images.

Everything here is torch-free so export (parity on real images) and benchmarks can use it too. The embedded
sets ship inside vitc as numpy files (data/embedded/, with their sources and licences; nothing is downloaded or
unpickled); their train/val split is a fixed, stratified 10 % per class.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.config import MAX_LABEL_CHARS, is_label
from models.preprocessing import Preprocessing, upright

EMBEDDED = ("animals", "mnist", "digits")
SPLITS = ("train", "val")
VAL_FRACTION = 0.1
SPLIT_SEED = 0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
# Per-dataset grey mean/std of the train split in [0, 1] (measured once; replicated over the 3 channels).
_GREY_STATS = {"animals": (0.2728, 0.4057), "mnist": (0.1315, 0.3088), "digits": (0.3054, 0.3759)}


class DatasetError(ValueError):
    """An unknown, empty or unreadable dataset."""


@dataclass
class ImageSet:
    """Labelled images: in-memory uint8 arrays (embedded sets) or file paths (folders)."""

    name: str
    split: str
    class_names: list[str]
    labels: np.ndarray  # (N,) int64
    arrays: np.ndarray | None = None  # (N, H, W) uint8 grey, embedded sets
    paths: list[Path] | None = None  # folder datasets

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Decode image i as PIL (grey "L" for embedded sets); raises OSError for corrupt files."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i], "L")
        with Image.open(self.paths[i]) as img:
            img.load()
            return upright(img)

    def fingerprint(self) -> str:
        """sha256 of what the set holds: classes, labels and pixels (embedded sets), or each file's path relative
        to the dataset root and its size (folders: their bytes are not read). Equal sets give equal prints."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.class_names)).encode())
        h.update(np.ascontiguousarray(self.labels, "<i8").tobytes())
        if self.arrays is not None:
            h.update(repr(self.arrays.shape).encode())
            h.update(np.ascontiguousarray(self.arrays).tobytes())
        for path in self.paths or []:
            rel = path.relative_to(self.name) if path.is_relative_to(self.name) else path.name
            h.update(f"{Path(rel).as_posix()}\0{path.stat().st_size}\n".encode())
        return h.hexdigest()

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A deterministic, class-balanced-ish random subset of at most n images."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ImageSet(
            self.name, self.split, self.class_names, self.labels[idx],
            None if self.arrays is None else self.arrays[idx],
            None if self.paths is None else [self.paths[i] for i in idx],
        )


EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"  # shipped with vitc; see its README for sources
_EMBEDDED_FILES = {"animals": "animals.npz", "mnist": "mnist5k.npz"}


def _embedded_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images (N, H, W) uint8 and labels of an embedded set."""
    if name in _EMBEDDED_FILES:
        path = EMBEDDED_DIR / _EMBEDDED_FILES[name]
        try:
            with np.load(path, allow_pickle=False) as z:
                x, y = z["images"], z["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"embedded dataset {name!r} is missing or damaged ({path}): {exc}") from None
        classes = list(ANIMAL_CLASSES) if name == "animals" else [str(i) for i in range(10)]
        return x.astype(np.uint8, copy=False), y.astype(np.int64, copy=False), classes
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        return x, d.target.astype(np.int64), [str(i) for i in range(10)]
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(EMBEDDED)}, or an ImageNet-layout folder")


def split_indices(labels: np.ndarray, split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Deterministic stratified split: the first 10 % of each class's seeded permutation is val."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(len(idx) * VAL_FRACTION))
        chosen.append(idx[:n_val] if split == "val" else idx[n_val:])
    return np.sort(np.concatenate(chosen))


def _folder(root: Path, split: str) -> ImageSet:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"dataset folder {root} has no {split}/ directory (expected root/{split}/<class>/*.jpg)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if split == "val" and (root / "train").is_dir():
        # Class indices come from train/ so both splits agree even if val lacks a class.
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"dataset folder {split_dir} has no class directories")
    if bad := next((c for c in classes if not is_label(c)), None):  # found now, not when the checkpoint is saved
        raise DatasetError(f"class directory {bad[:60]!r} in {split_dir.parent}: a class name must be "
                           f"1..{MAX_LABEL_CHARS} characters without control characters or line breaks; rename it")
    paths, labels = [], []
    for i, c in enumerate(classes):
        cdir = split_dir / c
        if not cdir.is_dir():
            continue
        for p in sorted(cdir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                paths.append(p)
                labels.append(i)
    if not paths:
        raise DatasetError(f"dataset folder {split_dir} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageSet(str(root), split, classes, np.asarray(labels, np.int64), paths=paths)


def load_dataset(name: str | os.PathLike, split: str) -> ImageSet:
    """A split ("train" or "val") of an embedded set or an ImageNet-layout folder; raises DatasetError."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    name_s = str(name)
    if name_s in EMBEDDED:
        x, y, classes = _embedded_arrays(name_s)
        idx = split_indices(y, split)
        return ImageSet(name_s, split, classes, y[idx], arrays=x[idx])
    root = Path(name_s)
    if root.is_dir():
        return _folder(root, split)
    raise DatasetError(
        f"unknown dataset {name_s!r}: not one of {', '.join(EMBEDDED)} and not a directory"
    )


def default_preprocessing(name: str | os.PathLike, image_size: int) -> Preprocessing:
    """Eval preprocessing saved with checkpoints: grey stats + plain resize for embedded sets, else ImageNet's."""
    name_s = str(name)
    if name_s in _GREY_STATS:
        mean, std = _GREY_STATS[name_s]
        return Preprocessing(resize=image_size, crop=image_size, mean=(mean,) * 3, std=(std,) * 3, mode="L")
    return Preprocessing.imagenet(image_size)


def decode_checked(path: Path) -> Image.Image | None:
    """Decode a file fully, or None if it is corrupt/unreadable (callers count skips)."""
    try:
        with Image.open(path) as img:
            img.load()
            return upright(img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        # DecompressionBombError (beyond PIL's pixel bound) is not an OSError: a bomb counts as unreadable.
        return None
