"""Datasets: the embedded sets (animals, mnist, digits) and ImageNet-layout folders, as labelled images.

Everything here is torch-free so export (parity on real images) and benchmarks can use it too. The embedded
sets ship inside vitc as numpy files (data/embedded/, with their sources and licences; nothing is downloaded or
unpickled); their train/val split is a fixed, stratified 10 % per class. Files are decoded by the server's rule
(`models.decoding`), and those it refuses (corrupt, too big, built to overwork the decoder) are skipped and counted
everywhere: training replaces them, evaluation leaves them out, and every other reader (export's parity and
calibration images, the served-path check, serve.sample) draws its images with `ImageSet.readable_subset`. Hidden
files (macOS's `._x.jpg`) are not images, and the directories `not_a_class` names are not classes: every reader
skips them by that one rule, and they are named wherever a folder's classes are summarised or refused
(`skipped_note`).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import stat
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.config import MAX_LABEL_CHARS, is_label
from models.oneline import one_line
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_FILE_BYTES, Preprocessing

if TYPE_CHECKING:
    from PIL import Image

    from models.imagecheck.common import DecodeError

EMBEDDED = ("animals", "mnist", "digits")
SPLITS = ("train", "val")
VAL_FRACTION = 0.1
SPLIT_SEED = 0
# The seed of every evaluation subset (train --val-subset, train.eval --limit, export's parity images): whatever a
# run's --seed, the same weights are measured on the same images everywhere.
EVAL_SUBSET_SEED = 0
# The suffixes Pillow gives the formats the server opens (`image_formats`): JPEG (.jfif is how browsers save it),
# PNG (.apng), WebP, BMP, GIF, TIFF, AVIF (.avifs). A file is decoded by its content, whatever its suffix.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                  ".avif", ".avifs"}
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
# Per-dataset grey mean/std of the train split in [0, 1] (measured once; replicated over the 3 channels).
_GREY_STATS = {"animals": (0.2728, 0.4057), "mnist": (0.1315, 0.3088), "digits": (0.3054, 0.3759)}


class DatasetError(ValueError):
    """An unknown, empty or unreadable dataset."""


class UnreadableImage(DatasetError):
    """A file that does not decode, met while images are read (by one process of several, perhaps)."""


@dataclass
class ImageSet:
    """Labelled images: in-memory uint8 arrays (embedded sets) or file paths (folders)."""

    name: str
    split: str
    class_names: list[str]
    labels: np.ndarray  # (N,) int64
    arrays: np.ndarray | None = None  # (N, H, W) uint8 grey, embedded sets
    paths: list[Path] | None = None  # folder datasets
    # The split's directories `not_a_class` left out: (name, image files directly inside), sorted by name.
    skipped_dirs: tuple[tuple[str, int], ...] = ()
    # One subdirectory (split/class/sub) of each class directory that holds some: not read (`nested_note`).
    nested_dirs: tuple[str, ...] = ()
    # Image files directly in the split's directory (split/name), outside any class: not read (`stray_note`).
    stray_files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Decode image i as PIL (grey "L" for embedded sets); UnreadableImage (one line) for a corrupt file."""
        if self.arrays is not None:
            from PIL import Image

            return Image.fromarray(self.arrays[i], "L")
        img = decoded(self.paths[i])
        if not isinstance(img, Exception):
            return img
        raise UnreadableImage(unreadable_text(self.paths[i], img))

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
            h.update(self._relative(path) + f"\0{_size(path)}\n".encode())
        return h.hexdigest()

    def content_sample(self) -> str | None:
        """sha256 over a bounded sample of a folder's bytes: `CONTENT_SAMPLE_FILES` files spread over the set
        (`content_sample_indices`), each by its relative path, size and the sha256 of its first and last
        `CONTENT_SAMPLE_BYTES` (`_ends`). None for an embedded set, whose fingerprint hashes its pixels already."""
        if self.paths is None:
            return None
        h = hashlib.sha256(f"vitc content sample 1: {len(self.paths)} files\n".encode())
        for i in content_sample_indices(len(self.paths)):
            h.update(self._relative(self.paths[i]) + b"\0" + _ends(self.paths[i]) + b"\n")
        return h.hexdigest()

    def _relative(self, path: Path) -> bytes:
        """A file's path relative to the dataset root, as the bytes its name has on disk (POSIX separators)."""
        rel = path.relative_to(self.name) if path.is_relative_to(self.name) else path.name
        # The name's own bytes: a name that is not UTF-8 (lone surrogates in Python) is hashed as it is on disk,
        # and a UTF-8 one as the strict encoding hashed it, so earlier runs' prints still match.
        return os.fsencode(Path(rel).as_posix())

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A deterministic, class-balanced-ish random subset of at most n images; DatasetError for a negative n
        (a slice would drop images from the end instead)."""
        picked = self.subset_indices(n, seed)
        return self if len(picked) == len(self) else self.take(picked)

    def subset_indices(self, n: int, seed: int = 0) -> np.ndarray:
        """The sorted indices of `subset(n, seed)`'s images in this set (all of them when n >= its size)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise DatasetError(f"a subset needs a whole number of images >= 0, got {n!r:.40}")
        if n >= len(self):
            return np.arange(len(self), dtype=np.int64)
        return np.sort(np.random.default_rng(seed).permutation(len(self))[:n])

    def take(self, indices: np.ndarray | list[int]) -> ImageSet:
        """The images at `indices`, in index order."""
        idx = np.sort(np.asarray(indices, np.int64))
        return ImageSet(
            self.name, self.split, self.class_names, self.labels[idx],
            None if self.arrays is None else self.arrays[idx],
            None if self.paths is None else [self.paths[i] for i in idx],
            self.skipped_dirs, self.nested_dirs, self.stray_files,
        )

    def labelled_as(self, class_names: list[str]) -> ImageSet:
        """This set with its labels as indices into `class_names` (a model's classes, in its order): a folder may
        hold only some of them, in any order. DatasetError (one line) naming the classes the model lacks."""
        if list(self.class_names) == list(class_names):
            return self
        index = {c: i for i, c in enumerate(class_names)}
        present = set(np.unique(self.labels).tolist())  # an empty class directory holds nothing to evaluate
        unknown = [c for i, c in enumerate(self.class_names) if c not in index and i in present]
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            hint = normalisation_hint(unknown, class_names, "the model's")
            raise DatasetError(f"dataset {self.name} class names differ from the checkpoint's: {len(unknown)} of "
                               f"its {len(self.class_names)} classes are not the model's ({shown}){hint}")
        remap = np.asarray([index.get(c, -1) for c in self.class_names], np.int64)  # -1: no image has it
        return ImageSet(self.name, self.split, list(class_names), remap[self.labels], self.arrays, self.paths,
                        self.skipped_dirs, self.nested_dirs, self.stray_files)

    def by_class(self) -> list[np.ndarray]:
        """Each class's image indices, in order (one sort, not a pass over the labels per class)."""
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return np.split(order, np.cumsum(counts)[:-1])

    def unreadable_classes(self, classes: Iterable[int]) -> list[int]:
        """Those of `classes` (label indices) with image files of which none decodes. A class's files are read in
        order up to its first readable one: one decode per class on good data."""
        if self.paths is None:
            return []
        members = self.by_class()
        return [c for c in classes if len(members[c])
                and all(decode_checked(self.paths[i]) is None for i in members[c])]

    def no_readable_image(self, c: int, during_run: bool = False) -> str:
        """The one line for class `c`, none of whose files decodes: its name, file count and first file, why that one
        does not decode, and what to do (before the training), or that they became unreadable (`during_run`: they
        were checked at its start)."""
        members = self.by_class()[c]
        first = self.paths[members[0]]
        files = f"{len(members)} file{'s' * (len(members) != 1)}, e.g. {first}"
        if during_run:
            return (f"class {self.class_names[c]!r} of the {self.split} split has no readable image left ({files}): "
                    "its files became unreadable while the run read them")
        said = f"class {self.class_names[c]!r} of the {self.split} split has no readable image ({files})"
        why = decoded(first)
        if not isinstance(why, Exception):  # readable again since it was read: nothing more to say of it
            return f"{said}: remove the directory or fix its files"
        if why.over_limit:  # a photo, not a broken file: "fix its files" would send the user looking for damage
            return f"{said}: the first is over the pixel limit, not corrupt ({why.reason}); {OVER_LIMIT_ADVICE}"
        return f"{said}: remove the directory or fix its files (the first: {why.reason})"

    def readable(self, order: Iterable[int], n: int, minimum: int = 1) -> Readable:
        """The first n images of `order` that decode (training's `decode_checked` rule); the files that do not are
        left out, counted and named, and the next ones of `order` take their place. DatasetError (one line) when
        fewer than `minimum` decode."""
        chosen: list[int] = []
        skipped: list[Path] = []
        for i in order:
            if len(chosen) >= n:
                break
            if self.paths is not None and decode_checked(self.paths[i]) is None:
                skipped.append(self.paths[i])
            else:
                chosen.append(int(i))
        if len(chosen) < minimum:
            example = f" (e.g. {skipped[0]})" if skipped else ""
            raise DatasetError(f"{self.name}: {len(chosen)} readable {self.split} images, at least {minimum} needed; "
                               f"{len(skipped)} files are corrupt or unreadable{example}")
        return Readable(self.take(chosen), tuple(skipped))

    def readable_subset(self, n: int, seed: int = 0, minimum: int = 1) -> Readable:
        """`subset(n, seed)` with corrupt files left out and counted: each is replaced by the next file of the same
        seeded order, so with none corrupt the images are exactly `subset(n, seed)`'s."""
        order = range(len(self)) if n >= len(self) else np.random.default_rng(seed).permutation(len(self))
        return self.readable(order, n, minimum)


def normalisation_hint(unknown: list[str], known: list[str], whose: str) -> str:
    """"; 'café' and {whose} 'café' differ only in Unicode normalisation ...": the first of the `unknown` names that
    is one of the `known` names written another way (NFD vs NFC, as a copy from macOS leaves it), or ""."""
    spelled = {unicodedata.normalize("NFC", c): c for c in known}
    near = next((c for c in unknown if unicodedata.normalize("NFC", c) in spelled), None)
    if near is None:
        return ""
    return (f"; {near!r} and {whose} {spelled[unicodedata.normalize('NFC', near)]!r} differ only in Unicode "
            "normalisation (NFD vs NFC): rename the directory")


@dataclass(frozen=True)
class Readable:
    """Images that decoded when they were chosen, and the corrupt or unreadable files left out to choose them."""

    images: ImageSet
    skipped: tuple[Path, ...] = ()

    def note(self) -> str:
        """", k unreadable files skipped" for progress lines, or "" when none was."""
        k = len(self.skipped)
        return f", {k} unreadable file{'s' if k != 1 else ''} skipped" if k else ""


# What to do about an image over the pixel limit, which only the server can raise (serve --max-image-pixels): the
# readers of a dataset decode by the server's default, so that what trains is what a default server accepts.
OVER_LIMIT_ADVICE = (f"training, train.eval and export read images of up to the server's default "
                     f"{DEFAULT_MAX_IMAGE_PIXELS:,} pixels and cannot raise it: downscale such images")


def unreadable_text(path: Path, why: DecodeError | None = None, hint: str = "") -> str:
    """"corrupt or unreadable image: PATH (the decoder's reason; hint)", or for an image over the pixel limit
    "image over the pixel limit (not a corrupt or unreadable image): PATH (its size ...; what to do; hint)". `why` is
    the file's DecodeError (read again when not given: the message of a file met in a worker)."""
    if why is None:
        found = decoded(path)
        why = found if isinstance(found, Exception) else None
    if why is not None and why.over_limit:
        return (f"image over the pixel limit (not a corrupt or unreadable image): {path} ({why.reason}; "
                f"{OVER_LIMIT_ADVICE}{f'; {hint}' if hint else ''})")
    said = "; ".join(part for part in (why.reason if why is not None else "", hint) if part)
    return f"corrupt or unreadable image: {path}" + (f" ({said})" if said else "")


def _size(path: Path) -> int:
    """A file's size, or -1 for one that cannot be stat'ed (a dangling link: it is counted as unreadable)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


# A folder's fingerprint holds names and sizes only: a resumed run moves to other data (`--resume --dataset NEW`)
# only when a bounded sample of their bytes matches too (`ImageSet.content_sample`), which tells a dataset of the
# same names and sizes (fixed-size BMPs, a re-rendered copy) from the run's own. At most 64 files a split, each read
# at its two ends: 8 MiB a split at most, whatever the dataset's size.
CONTENT_SAMPLE_FILES = 64
CONTENT_SAMPLE_BYTES = 64 << 10


def content_sample_indices(n: int) -> np.ndarray:
    """The indices of at most `CONTENT_SAMPLE_FILES` of n files, evenly strided from the first to the last (both
    always in), sorted: integer arithmetic, the same on every machine."""
    k = min(n, CONTENT_SAMPLE_FILES)
    if k < 2:
        return np.arange(k, dtype=np.int64)
    return np.arange(k, dtype=np.int64) * (n - 1) // (k - 1)


def content_key(split: str) -> str:
    """The key of a split's `ImageSet.content_sample` in a run's data record, beside its fingerprint (`split`)."""
    return f"{split}_content"


def _ends(path: Path) -> bytes:
    """b"SIZE:SHA256" of a file's first and last `CONTENT_SAMPLE_BYTES` (at most twice that is read), or b"unreadable"
    for one that cannot be opened or read now (a dangling link, a vanished file) and b"not a file" for one that is
    no regular file any more: said the same wherever it happens, never raised."""
    try:  # O_NONBLOCK: a FIFO put in a file's place is not waited on (it changes nothing for a file)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return b"unreadable"
    with open(fd, "rb") as f:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return b"not a file"
            size = info.st_size
            h = hashlib.sha256(f.read(CONTENT_SAMPLE_BYTES))
            if size > CONTENT_SAMPLE_BYTES:  # a small file's head is all of it
                f.seek(size - CONTENT_SAMPLE_BYTES)
                h.update(b"\0" + f.read(CONTENT_SAMPLE_BYTES))
        except OSError:
            return b"unreadable"
    return f"{size}:{h.hexdigest()}".encode()


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


# Directories that tools, not people, put beside the class directories: macOS's zips carry `__MACOSX` (an
# AppleDouble `._x` copy of each file), Synology's NAS writes `@eaDir` (thumbnails) into every folder.
SYSTEM_DIRS = frozenset({"__MACOSX", "@eaDir"})


def not_a_class(name: str) -> bool:
    """Whether a directory named `name` under train/ or val/ is skipped rather than read as a class: a hidden one
    (a leading ".": Jupyter's .ipynb_checkpoints, .git, .Trash-1000) or one of SYSTEM_DIRS. The one rule of every
    reader of a folder (training, train.eval, export's parity and calibration images, serve.sample)."""
    return name.startswith(".") or name in SYSTEM_DIRS


def skipped_classes_text(skipped: list[str], whose: str, dataset: str, consequence: str, remedy: str) -> str:
    """The one line for a model's or run's classes `skipped` that `not_a_class` now leaves out of `dataset` (they
    were classes before vitc skipped them): which, why, `consequence`, and `remedy` (or a rename to keep them)."""
    one = len(skipped) == 1
    names = ", ".join(repr(c) for c in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    return (f"{whose} class{'es' * (not one)} {names} of {dataset} {'is' if one else 'are'} now skipped as "
            f"{'a tool folder' if one else 'tool folders'} ({' and '.join(sorted(SYSTEM_DIRS))} are folders tools "
            f"write, and a directory starting with '.' is hidden: neither is a class), so {consequence}: {remedy}; "
            f"to keep {'it as a class' if one else 'them as classes'}, rename the director{'y' if one else 'ies'} "
            "first")


def _class_dirs(split_dir: Path) -> tuple[list[str], list[str]]:
    """The class directory names of a split and the directory names `not_a_class` left out, each sorted."""
    names = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    return [n for n in names if not not_a_class(n)], [n for n in names if not_a_class(n)]


def skipped_note(*sets: ImageSet) -> str:
    """The directories the folder splits `sets` left out as not classes, named in one clause ("2 directories
    skipped as hidden or system ones, not classes: '.NET' (in train/ and val/, 25 images), ..."; "hidden" or
    "system" alone where only those were), or "" for none."""
    return _skipped_text([(s.split, name, n) for s in sets for name, n in s.skipped_dirs])


def stray_note(*sets: ImageSet, limit: int = 3) -> str:
    """"note: 2 image files lie directly in train/ or val/, outside any class directory, and are not read (e.g.
    train/x.jpg, ...): ..." for the folder splits `sets`, or "" for none: a file's class is its directory."""
    stray = [f for s in sets for f in s.stray_files]
    if not stray:
        return ""
    one = len(stray) == 1
    splits = " or ".join(f"{s.split}/" for s in sets if s.stray_files)
    shown = ", ".join(stray[:limit]) + (", ..." if len(stray) > limit else "")
    return one_line(f"note: {len(stray)} image file{'s' * (not one)} lie{'s' * one} directly in {splits}, outside any "
                    f"class directory, and {'is' if one else 'are'} not read (e.g. {shown}): move each into its "
                    "class's directory")


def nested_note(*sets: ImageSet, limit: int = 3) -> str:
    """"note: 2 class directories hold subdirectories, which are not read (e.g. train/a/more, ...)" for the folder
    splits `sets`, or "" for none: a class's images are the files directly in its directory (torchvision's
    ImageFolder reads deeper; reading them here would change which images a dataset holds)."""
    nested = [d for s in sets for d in s.nested_dirs]
    if not nested:
        return ""
    one = len(nested) == 1
    shown = ", ".join(nested[:limit]) + (", ..." if len(nested) > limit else "")
    # Escaped: a name that is not UTF-8 (lone surrogates) cannot be written to a strict UTF-8 stdout.
    return one_line(f"note: {len(nested)} class director{'y' if one else 'ies'} hold{'s' * one} subdirectories, "
                    f"which are not read (e.g. {shown})")


def _skipped_text(skipped: list[tuple[str, str, int]], limit: int = 5) -> str:
    """`skipped_note` of (split, directory name, image files directly inside), at most `limit` names shown."""
    where: dict[str, list[str]] = {}
    images: dict[str, int] = {}
    for split, name, n in skipped:
        where.setdefault(name, []).append(f"{split}/")
        images[name] = images.get(name, 0) + n
    if not where:
        return ""
    shown = ", ".join(f"{name!r} (in {' and '.join(splits)}" + (f", {images[name]} image{'s' * (images[name] != 1)})"
                                                                if images[name] else ")")
                      for name, splits in list(where.items())[:limit])
    more = f", ... ({len(where) - limit} more)" if len(where) > limit else ""
    hidden = [name for name in where if name.startswith(".")]
    kinds = " or ".join(kind for kind, some in (("hidden", hidden), ("system", len(hidden) < len(where))) if some)
    # Advice only for what held images (what the model lost), and for what was skipped: a '.' to rename away, or
    # a tool's folder (__MACOSX, @eaDir), which is never a class.
    advice = "".join(tip for tip, held in (
        ("; a class directory must not start with '.'", any(images[name] for name in hidden)),
        (f"; {' and '.join(sorted(SYSTEM_DIRS))} are folders tools write, never classes",
         any(images[name] for name in where if name not in hidden))) if held)
    return (f"{len(where)} director{'ies' if len(where) != 1 else 'y'} skipped as {kinds} ones, not "
            f"classes: {shown}{more}{advice}")


def _image_file(p: Path) -> bool:
    """Whether `p`, found in a listing, is listed as an image: an image suffix, not hidden, a file or a link that
    leads nowhere (counted as unreadable like any other file that does not decode)."""
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and (
        p.is_file() or (p.is_symlink() and not p.exists()))


def _stray_files(split_dir: Path, split: str) -> tuple[str, ...]:
    """The image files directly in a split's directory, beside its class directories, as "split/name", sorted."""
    return tuple(f"{split}/{p.name}" for p in sorted(split_dir.iterdir()) if _image_file(p))


def _images_in(cdir: Path) -> list[Path]:
    """The image files of one class directory, sorted. Hidden files are left out, as hidden directories are
    (macOS's AppleDouble `._x.jpg` beside each image of a copied folder is metadata, not an image); a link that
    leads nowhere is listed, to be counted as unreadable like any other file that does not decode."""
    return _listing(cdir)[0]


def _listing(cdir: Path) -> tuple[list[Path], list[Path]]:
    """`_images_in(cdir)`, and the subdirectories of `cdir` that are not read (all but those `not_a_class` names,
    which tools write), sorted: from one listing, a stat only for what is not an image file."""
    images: list[Path] = []
    subdirs: list[Path] = []
    for p in sorted(cdir.iterdir()):
        if _image_file(p):
            images.append(p)
        elif p.is_dir() and not not_a_class(p.name):
            subdirs.append(p)
    return images, subdirs


def _image_count(d: Path) -> int:
    """How many image files `_images_in` lists in `d`; 0 for a directory that cannot be read (it is skipped)."""
    try:
        return len(_images_in(d))
    except OSError:
        return 0


def _check_class_name(name: str, where: Path) -> None:
    """DatasetError unless `name` can be a class name (found now, not when the checkpoint is saved)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes come back from the file system as lone surrogates
        raw = os.fsencode(name)
        raise DatasetError(f"class directory {raw[:60]!r} in {where}: the name is not valid UTF-8 (class names are "
                           f"stored as UTF-8 text); rename it") from None
    if not is_label(name):
        raise DatasetError(f"class directory {name[:60]!r} in {where}: a class name must be "
                           f"1..{MAX_LABEL_CHARS} characters without control characters or line breaks; rename it")


def _folder(root: Path, split: str, match_train: bool = True) -> ImageSet:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"dataset folder {root} has no {split}/ directory (expected root/{split}/<class>/*.jpg)")
    classes, skipped = _class_dirs(split_dir)
    # Counted, so a summary or a refusal can say whether images were left out with them (a class named ".NET").
    skipped_dirs = tuple((name, _image_count(split_dir / name)) for name in skipped)
    note = _skipped_text([(split, name, n) for name, n in skipped_dirs])
    note = f"; {note}" if note else ""
    if split == "val" and match_train and (root / "train").is_dir():
        # Class indices come from train/ so both splits agree even if val lacks a class. A class only val has
        # is one the model cannot predict: its images would count as errors, so it is refused, not ignored.
        # Training's rule: a reader of a trained model matches val/ to the model's classes instead (`load_labelled`).
        train_classes, train_skipped = _class_dirs(root / "train")
        known = set(train_classes)
        val_only = [c for c in classes if c not in known and _images_in(split_dir / c)]
        if val_only:
            shown = ", ".join(repr(c) for c in val_only[:5]) + (", ..." if len(val_only) > 5 else "")
            both = _skipped_text([("train", name, _image_count(root / "train" / name)) for name in train_skipped]
                                 + [(split, name, n) for name, n in skipped_dirs])
            hint = normalisation_hint(val_only, train_classes, "train/'s")  # copied from macOS, perhaps
            raise DatasetError(f"dataset folder {split_dir} has {len(val_only)} class(es) that train/ lacks "
                               f"({shown}): a model trained on train/ cannot predict them; add them to train/ or "
                               f"move them out of val/{hint}" + (f"; {both}" if both else ""))
        classes = train_classes
    if not classes:
        raise DatasetError(f"dataset folder {split_dir} has no class directories{note}")
    if match_train:  # training's: every class it trains on or validates against is named, images or not
        for c in classes:
            _check_class_name(c, split_dir.parent)
    paths, labels, empty, nested = [], [], [], []
    for i, c in enumerate(classes):
        cdir = split_dir / c
        if not cdir.is_dir():
            continue
        found, subdirs = _listing(cdir)
        if found and not match_train:
            # A reader's own classes: a directory without images is nothing it reads (`labelled_as` drops it), so
            # its name is not refused either; training accepted it beside the classes it took from train/.
            _check_class_name(c, split_dir.parent)
        paths += found
        labels += [i] * len(found)
        if not found:
            empty.append(c)
        if subdirs:
            nested.append(f"{split}/{c}/{subdirs[0].name}")
    if empty and paths and split == "train":
        # A class without a training image would still get an output, trained only to be never chosen, and be
        # exported and served (torchvision's ImageFolder refuses it too).
        shown = ", ".join(repr(c) for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DatasetError(f"dataset folder {split_dir} has {len(empty)} class director(ies) with no image file "
                           f"directly inside ({shown}; images in subdirectories are not read): add images or "
                           "remove the directory")
    if not paths:
        raise DatasetError(f"dataset folder {split_dir} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                           f"in its class directories ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
                           f"{note}")
    return ImageSet(str(root), split, classes, np.asarray(labels, np.int64), paths=paths, skipped_dirs=skipped_dirs,
                    nested_dirs=tuple(nested), stray_files=_stray_files(split_dir, split))


def load_dataset(name: str | os.PathLike, split: str, *, match_train: bool = True) -> ImageSet:
    """A split ("train" or "val") of an embedded set or an ImageNet-layout folder; raises DatasetError. A folder's
    val/ takes train/'s classes and may not hold one train/ lacks (training's rule); `match_train=False`: its own
    class directories, whatever train/ holds (for readers that name them or match them to a model's classes)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    name_s = str(name)
    if not name_s.strip():  # Path("") is the current directory: an unset variable must not read whatever is here
        raise DatasetError(f"the dataset is empty: give one of {', '.join(EMBEDDED)} or an ImageNet-layout folder")
    if name_s in EMBEDDED:
        _note_shadowed(name_s)
        x, y, classes = _embedded_arrays(name_s)
        idx = split_indices(y, split)
        return ImageSet(name_s, split, classes, y[idx], arrays=x[idx])
    root = Path(name_s)
    if root.is_dir():
        return _folder(root, split, match_train)
    raise DatasetError(
        f"unknown dataset {name_s!r}: not one of {', '.join(EMBEDDED)} and not a directory"
    )


def load_labelled(name: str | os.PathLike, split: str, class_names: Sequence[str]) -> ImageSet:
    """A split labelled as a model's classes (`labelled_as`), the rule of every reader of a trained model (train.eval,
    export's parity, the served-path check): val/ is matched to them by name, not to a train/ beside it, which may
    be another task's; DatasetError (one line) naming the classes the model lacks, or those of its classes whose
    images the folder holds in a directory `not_a_class` now skips (a model trained before vitc skipped them)."""
    data = load_dataset(name, split, match_train=False)
    # Read on, the model would be measured (and certified) on its other classes alone, without a word.
    if skipped := [c for c, images in data.skipped_dirs if images and c in class_names]:
        raise DatasetError(skipped_classes_text(
            skipped, "this model's", str(name), f"its {split}/ images of {'it' if len(skipped) == 1 else 'them'} "
            f"would go unread and the model be measured on its other classes alone", "train a new model"))
    return data.labelled_as(list(class_names))


_SHADOWED_NOTED: set[str] = set()  # the directories `_note_shadowed` has spoken of in this process


def _note_shadowed(name: str) -> None:
    """A note on stderr, once per process, when a directory here has an embedded set's name: the name means the
    embedded set (runs recorded it so), and a user who meant the folder would otherwise not know it went unread."""
    here = Path(name)
    if not here.is_dir():
        return
    key = str(here.resolve())
    # Every rank of a distributed run loads the data: rank 0 (torchrun's RANK, unset in one process) says it.
    if key in _SHADOWED_NOTED or os.environ.get("RANK", "0") != "0":
        return
    _SHADOWED_NOTED.add(key)
    print(f"note: {name!r} is vitc's embedded {name} set, not the directory {name}/ here, which is not read: pass "
          f"./{name} for the folder", file=sys.stderr, flush=True)


def default_preprocessing(name: str | os.PathLike, image_size: int) -> Preprocessing:
    """Eval preprocessing saved with checkpoints: grey stats + plain resize for embedded sets, else ImageNet's."""
    name_s = str(name)
    if name_s in _GREY_STATS:
        mean, std = _GREY_STATS[name_s]
        return Preprocessing(resize=image_size, crop=image_size, mean=(mean,) * 3, std=(std,) * 3, mode="L")
    return Preprocessing.imagenet(image_size)


def decode_checked(path: Path) -> Image.Image | None:
    """Decode a file by the server's rule (`models.decoding`: its formats, structure checks, PNG metadata bounds and
    its default pixel bound, `DEFAULT_MAX_IMAGE_PIXELS`), or None for a file the server would refuse or that cannot
    be read (callers count skips; `unreadable_text` says why)."""
    img = decoded(path)
    return None if isinstance(img, Exception) else img


def decoded(path: Path) -> Image.Image | DecodeError:
    """`decode_checked`'s image, or the DecodeError that says why the file does not decode (its `reason`, and
    `over_limit` for an image with more pixels than the limit)."""
    from models.decoding import decode_image  # PIL: only when an image is read
    from models.imagecheck.common import DecodeError

    too_big = f"the file is larger than the limit of {MAX_IMAGE_FILE_BYTES} bytes"
    try:  # a dangling link, a file that vanished or cannot be read: unreadable
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_IMAGE_FILE_BYTES:  # a huge file named .jpg is not read at all
                return DecodeError(too_big)
            data = f.read(MAX_IMAGE_FILE_BYTES + 1)  # bounded still: a file that grew, or a device
    except OSError as exc:
        return DecodeError(f"cannot read it: {exc.strerror or type(exc).__name__}")
    if len(data) > MAX_IMAGE_FILE_BYTES:
        return DecodeError(too_big)
    try:
        return decode_image(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    except DecodeError as exc:
        return exc
