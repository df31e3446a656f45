"""Top-1 / top-5 evaluation in fp32 through the serving preprocessing, during training and for checkpoints."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.datasets import EVAL_SUBSET_SEED, DatasetError, ImageSet, UnreadableImage, load_labelled, unreadable_text
from models.checkpoint import load_checkpoint
from models.preprocessing import Preprocessing
from train.distributed import DistInfo, all_reduce_sum
from train.pipeline import EvalCollate, EvalImages, loader


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, info: DistInfo, channels_last: bool = False,
             fail_on_corrupt: bool = False) -> dict[str, float]:
    """Top-1, top-5 (fractions), mean loss, counts over all ranks' shards; corrupt images are left out, and an image
    whose scores are not all finite (a diverged model) counts as misclassified (its loss makes the mean null)."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # top1, top5, loss, evaluated, skipped
    for batch in batches:
        if batch.corrupt and fail_on_corrupt:
            raise UnreadableImage(unreadable_text(Path(batch.corrupt[0]), hint="--corrupt skip leaves it out"))
        x = batch.images.to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, ok = batch.labels.to(info.device), batch.ok.to(info.device)
        logits = model(x).float()[ok]
        y = y[ok]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        # A diverged model's NaN (or infinite) scores rank nothing: topk would pick arbitrary classes and report
        # chance-level accuracy for it. Such an image counts as misclassified.
        finite = torch.isfinite(logits).all(dim=1)
        sums[0] += float(((top[:, 0] == y) & finite).sum())
        sums[1] += float(((top == y[:, None]).any(dim=1) & finite).sum())
        sums[2] += float(F.cross_entropy(logits, y, reduction="sum")) if len(y) else 0.0
        sums[3] += float(len(y))
        sums[4] += float((~ok).sum())
    model.train(was_training)
    top1, top5, loss, n, skipped = all_reduce_sum(sums, info)
    n_safe = max(n, 1.0)
    mean_loss = loss / n_safe
    return {"top1": top1 / n_safe, "top5": top5 / n_safe, "loss": mean_loss if math.isfinite(mean_loss) else None,
            "samples": int(n),
            "skipped_corrupt": int(skipped)}


def eval_loader(images: ImageSet, spec: Preprocessing, info: DistInfo, *, batch_size: int, workers: int,
                cache: np.ndarray | None = None) -> Any:
    """This rank's strided shard of an eval split, batched and normalised."""
    ds = EvalImages(images, spec, cache)
    shard = list(range(info.rank, len(ds), info.world_size))
    return loader(ds, batch_size=batch_size, indices=shard, workers=workers, collate=EvalCollate(spec),
                  pin=info.device.type == "cuda")


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, split: str = "val", *,
                        batch_size: int = 256, workers: int = 0, corrupt: str = "skip",
                        device: str = "cpu", limit: int = 0) -> dict[str, Any]:
    """Load a checkpoint and evaluate it on a dataset split with its own preprocessing."""
    from train.distributed import pick_device

    model, meta = load_checkpoint(checkpoint)
    name = dataset or meta.dataset
    if not name:
        raise DatasetError("the checkpoint records no dataset; pass --dataset")
    # The checkpoint's classes, matched by name: a folder may hold some of them, in any order, and its train/ (if
    # any) plays no part. On the folder the run trained on, that labels val/ as training did (its classes are
    # train/'s), so the fingerprint below is the one the run recorded.
    images = load_labelled(name, split, meta.class_names)
    if limit:
        images = images.subset(limit, seed=EVAL_SUBSET_SEED)  # as training draws --val-subset
    fingerprint = images.fingerprint()  # of the set as it is on disk, as training recorded it
    dev = pick_device(device)
    info = DistInfo(0, 1, 0, 1, dev)
    model.to(dev)
    t0 = time.perf_counter()
    batches = eval_loader(images, meta.preprocessing, info, batch_size=batch_size, workers=workers)
    result = evaluate(model, batches, info, fail_on_corrupt=corrupt == "fail")
    recorded = meta.training.data.get(split) if meta.training is not None else None
    return {
        "checkpoint": str(Path(checkpoint)), "model": meta.model, "weights_sha256": meta.weights_sha256,
        "dataset": str(name), "split": split, **result, "seconds": round(time.perf_counter() - t0, 3),
        "device": str(dev), "images_fingerprint": fingerprint,
        # Whether these are the very images the run reported its numbers on (None: the checkpoint does not say).
        "same_images_as_training": None if recorded is None else recorded == fingerprint,
    }
