"""Batches for training and evaluation from a `data.datasets.ImageSet`.

Embedded sets are decoded once into a uint8 tensor with the checkpoint's `to_uint8` and augmented on tensors;
folders are decoded per sample in DataLoader workers. Evaluation always goes through
`models.preprocessing.to_uint8` + `normalize`, the exact functions the server runs, so validation accuracy is
served accuracy. Corrupt files are replaced by the next readable image of their class (training) or left out
(evaluation); their paths travel with the batch so the caller counts them or, with --corrupt fail, stops with the path.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.datasets import DatasetError, ImageSet, decode_checked
from models.cli import deferred_signals, raise_discarded_signal
from models.preprocessing import Preprocessing, normalize, to_mode, to_uint8
from train.augment import derive_seed, seeded, train_transform

# Bounds in-memory decoding (uint8 bytes) so a large folder is never cached by accident.
_MAX_CACHE_BYTES = 4 << 30


def predecode(images: ImageSet, spec: Preprocessing, progress: bool = False) -> np.ndarray:
    """Every image -> (N, crop, crop, 3) uint8 through the serving `to_uint8`; embedded sets only."""
    if images.arrays is None:
        raise ValueError("predecode is for in-memory (embedded) sets")
    n, c = len(images), spec.crop
    if n * c * c * 3 > _MAX_CACHE_BYTES:
        raise DatasetError(f"{images.name}: {n} images at {c}x{c} exceed the {_MAX_CACHE_BYTES >> 30} GiB cache")
    out = np.empty((n, c, c, 3), np.uint8)
    from tqdm import tqdm

    for i in tqdm(range(n), desc=f"decode {images.split}", disable=not progress or n < 20000, leave=False):
        out[i] = to_uint8(images.image(i), spec)
    return out


class TrainSample(NamedTuple):
    """One augmented training sample: uint8 (3, S, S), its label, the run's unreadable files passed over to find its
    image (its own first), and whether one was found (False: no file of its class decodes, and `image` is blank)."""

    image: torch.Tensor
    label: int
    replaced: tuple[str, ...]
    found: bool


class TrainImages(Dataset):
    """Augmented training samples keyed by (epoch, index) -> `TrainSample`. An unreadable file is replaced by the
    next readable image of its class (wrapping round within it), so labels and class balance stay as listed. With
    `source` (the full listing `images` were drawn from and each image's index in it: a --train-subset), the next
    one of the class's full listing: a subset that drew only broken files of a class still trains on the class."""

    def __init__(self, images: ImageSet, spec: Preprocessing, augment: str, crop_scale: float, hflip: float,
                 seed: int, cache: np.ndarray | None = None,
                 source: tuple[ImageSet, np.ndarray] | None = None) -> None:
        self.images, self.seed = images, seed
        self.listing, picked = source if source is not None else (images, np.arange(len(images)))
        self.mode, self.crop = spec.mode, spec.crop
        self.labels = torch.from_numpy(images.labels)
        # (N, H, W, 3) -> (N, 3, H, W): v2 transforms take CHW tensors.
        self.cache = None if cache is None else torch.from_numpy(cache).permute(0, 3, 1, 2)
        self.transform = train_transform(augment, spec, crop_scale, hflip, pil_input=cache is None)
        # Each class's indices in the listing, in order, and each image's place among them: where its replacements
        # are searched.
        self.members = self.listing.by_class()
        place = np.empty(len(self.listing), np.int64)
        for members in self.members:
            place[members] = np.arange(len(members))
        self.place = place[picked]
        # The listing's files that are images of this run: only they are reported as replaced (a broken file the
        # subset did not draw is passed over, as any unreadable file, but no sample of the run stood in for it).
        self.drawn = np.zeros(len(self.listing), bool)
        self.drawn[picked] = True
        # Files this process found unreadable, passed over without another decode: a run of k broken files costs k
        # decodes per epoch, not k * k / 2 (the replacements are the same, so is what each sample reports).
        self.unreadable: set[str] = set()

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> tuple[object | None, tuple[str, ...]]:
        """(image, or None when no file of the class decodes; paths of the run's unreadable files passed over)."""
        if self.cache is not None:
            return self.cache[index], ()
        members = self.members[int(self.labels[index])]
        start, bad = int(self.place[index]), []
        for k in range(len(members)):
            i = members[(start + k) % len(members)]
            file = self.listing.paths[i]
            path = str(file)
            img = None if path in self.unreadable else decode_checked(file)
            if img is not None:
                # Grey data becomes grey replicated to RGB, as the eval path and the server do.
                return to_mode(img, self.mode).convert("RGB"), tuple(bad)
            self.unreadable.add(path)
            if self.drawn[i]:
                bad.append(path)
        return None, tuple(bad)

    def __getitem__(self, key: tuple[int, int]) -> TrainSample:
        epoch, index = key
        img, bad = self._load(index)
        label = int(self.labels[index])
        if img is None:  # said by the trainer, which knows the class's name (not in a worker's traceback)
            return TrainSample(torch.zeros((3, self.crop, self.crop), dtype=torch.uint8), label, bad, False)
        with seeded(derive_seed(self.seed, epoch, index)):
            x = self.transform(img)
        return TrainSample(x, label, bad, True)


class EvalImages(Dataset):
    """Evaluation samples -> (uint8 (S, S, 3) through `to_uint8`, label, path if corrupt else "")."""

    def __init__(self, images: ImageSet, spec: Preprocessing, cache: np.ndarray | None = None) -> None:
        self.images, self.spec, self.cache = images, spec, cache

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, str]:
        label = int(self.images.labels[index])
        if self.cache is not None:
            return self.cache[index], label, ""
        if self.images.arrays is not None:
            return to_uint8(self.images.image(index), self.spec), label, ""
        img = decode_checked(self.images.paths[index])
        if img is None:
            c = self.spec.crop
            return np.zeros((c, c, 3), np.uint8), label, str(self.images.paths[index])
        return to_uint8(img, self.spec), label, ""


@dataclass
class EvalBatch:
    """A normalised evaluation batch; `ok` marks the images that decoded, `corrupt` lists the others."""

    images: torch.Tensor
    labels: torch.Tensor
    ok: torch.Tensor
    corrupt: list[str]


class EvalCollate:
    """Stack uint8 images and normalise them with the serving `normalize` (runs inside workers)."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, items: list[tuple[np.ndarray, int, str]]) -> EvalBatch:
        arrays, labels, bad = zip(*items, strict=True)
        x = torch.from_numpy(normalize(np.stack(arrays), self.spec))
        ok = torch.tensor([not b for b in bad], dtype=torch.bool)
        return EvalBatch(x, torch.tensor(labels, dtype=torch.long), ok, [b for b in bad if b])


class TrainBatch(NamedTuple):
    """A training batch: uint8 (B, 3, S, S), labels (B,), the unreadable files its samples passed over, how many of
    its samples stand in for an unreadable file (one each, however many they passed over), and the labels of
    samples whose class has no readable file left."""

    images: torch.Tensor
    labels: torch.Tensor
    corrupt: list[str]
    replaced: int
    lost: list[int]


def train_collate(items: list[TrainSample]) -> TrainBatch:
    """Stack a batch's samples (runs inside workers)."""
    xs, ys, bad, found = zip(*items, strict=True)
    return TrainBatch(torch.stack(xs), torch.tensor(ys, dtype=torch.long), [b for paths in bad for b in paths],
                      sum(1 for paths in bad if paths), [y for y, ok in zip(ys, found, strict=True) if not ok])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffled order of all n images, identical on every rank."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)


class EpochBatches:
    """This rank's batches of one epoch from `start_step` (drop_last; rank r takes slice r of each global batch)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, epoch: int, start_step: int = 0) -> None:
        self.batch, self.rank, self.world, self.epoch, self.start = batch, rank, world, epoch, start_step
        self.steps = n // (batch * world)
        self.order = epoch_permutation(n, seed, epoch)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gb = self.batch * self.world
        for step in range(self.start, self.steps):
            lo = step * gb + self.rank * self.batch
            yield [(self.epoch, int(i)) for i in self.order[lo:lo + self.batch]]


class _Loader(DataLoader):
    """A DataLoader whose workers start with Ctrl-C and SIGTERM held (`models.cli.deferred_signals`): a signal then
    is raised once they run, in the main process, and reaches none of them before `_leave_signals` set theirs.
    Between batches it raises one that Python discarded (`raise_discarded_signal`: an iterator's `__del__`)."""

    def __iter__(self) -> Iterator:
        if self.num_workers == 0:  # nothing forks
            batches = super().__iter__()
        else:
            with deferred_signals():
                batches = super().__iter__()
        return _checked(batches)


def _checked(batches: Iterator) -> Iterator:
    """`batches`, with a discarded Ctrl-C or SIGTERM raised before each."""
    for batch in batches:
        raise_discarded_signal()
        yield batch


def loader(dataset: Dataset, batch_sampler: object = None, *, batch_size: int | None = None,
           indices: list[int] | None = None, workers: int, collate: Callable, pin: bool) -> DataLoader:
    """A DataLoader over explicit batches (training) or a fixed index list (evaluation).

    Its own generator keeps it from drawing worker seeds from the global RNG (samples are seeded per index).
    """
    gen = torch.Generator().manual_seed(0)
    if batch_sampler is not None:
        return _Loader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                       pin_memory=pin, persistent_workers=False, generator=gen, worker_init_fn=_leave_signals)
    subset = torch.utils.data.Subset(dataset, indices) if indices is not None else dataset
    return _Loader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                   pin_memory=pin, generator=gen, worker_init_fn=_leave_signals)


def _leave_signals(worker_id: int) -> None:
    """In a DataLoader worker: Ctrl-C is ignored, and so is a SIGTERM that does not come from the main process.
    `timeout`, Slurm and systemd signal the whole process group, and the main process stops on it itself, shutting
    its workers down (or they see it gone within seconds). A worker killed by that signal made torch raise
    "DataLoader worker is killed by signal" over the clean stop (a traceback, exit 1); one ended by it at once could
    leave a lock it shares with the main process held (the loader's shutdown event, polled between batches), and
    the main process then hung setting that event. The main process's own SIGTERM (`terminate()`, sent once it no
    longer needs the worker: at its shutdown, or at exit after an error) still ends it: ignoring that one too hung a
    run whose other worker had died, in multiprocessing's join at exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_hang_ups(sys.excepthook)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT,))
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: the main process's SIGTERM and the group's end it alike
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM,))
        return
    # Blocked (as the worker was forked by `_Loader`), in this thread and so in every thread it starts: the signal
    # waits for `_sigterm_from_parent`, which can tell who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM,))
    threading.Thread(target=_sigterm_from_parent, name="vitc-worker-sigterm", daemon=True).start()


def _sigterm_from_parent() -> None:
    """A worker's thread: exit at the first SIGTERM the main process sent (others are dropped)."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
            os._exit(0)


def _quiet_hang_ups(report: Callable[..., object]) -> Callable[..., None]:
    """A worker's sys.excepthook: `report`, but silent on a connection the main process dropped. multiprocessing's
    thread that hands a batch's tensors to it (as file descriptors) reports through this hook, and a main process
    stopped by the signal mid-hand-over reset the connection: a traceback beside the run's one line. The main
    process says why it stopped (or, were it running on, what it failed to receive) itself."""
    def hook(kind: type[BaseException], exc: BaseException, tb: object) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            report(kind, exc, tb)
    return hook
