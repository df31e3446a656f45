"""The tensors an artifact must expose to be served, one rule for every runtime: exactly the manifest's float32 input
(B, C, H, W) and float32 output (B, classes), their batch axis dynamic, taking every size from 1 to the manifest's
max batch.

Each runtime reads its artifact's inputs and outputs into `TensorInfo`s when it opens it (OpenVINO's export checks its
IR by the same rule), so a foreign artifact is refused at load with one line: one whose ports were bound by position
fed an unused input (the same logits for every image) or read a decoy output, and one with a fixed batch passed the
one-image warm-up, reported ready and failed every larger batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from runtimes.base import BackendError

DYNAMIC = -1  # an axis of no fixed size


class TensorInfo(NamedTuple):
    """One input or output of an artifact: name, "input" or "output", dtype ("float32", else the runtime's name),
    shape (DYNAMIC for an axis of no fixed size; None: rank unknown) and the sizes a dynamic batch axis takes
    (low, high; high None: no bound)."""

    name: str
    mode: str
    dtype: str
    shape: tuple[int, ...] | None
    batches: tuple[int, int | None] = (1, None)


def check_io(tensors: Sequence[TensorInfo], input_name: str, output_name: str, sample_shape: tuple[int, int, int],
             classes: int, max_batch: int, what: str = "engine") -> None:
    """BackendError (one line, naming `what`) unless the I/O is exactly the manifest's: one float32 input
    (B, *sample_shape) and one float32 output (B, classes), each batch axis B dynamic over at least 1..max_batch."""
    inputs = [t for t in tensors if t.mode == "input"]
    outputs = [t for t in tensors if t.mode == "output"]
    # The backends bind these two names and nothing else: an extra input is never set (TensorRT fails its first call,
    # OpenVINO computed on whatever it held), and an extra output is work no one reads.
    if [t.name for t in inputs] != [input_name] or [t.name for t in outputs] != [output_name]:
        raise BackendError(f"{what} has inputs {[t.name for t in inputs]} and outputs {[t.name for t in outputs]}; "
                           f"the manifest expects {input_name!r} -> {output_name!r} and nothing else")
    # The batches handed in and the arrays read back are float32 of these shapes: anything else is refused by the
    # runtime on the first call that differs, or read as garbage.
    for tensor, shape in ((inputs[0], (DYNAMIC, *sample_shape)), (outputs[0], (DYNAMIC, classes))):
        if tensor.dtype != "float32":
            raise BackendError(f"{what} {tensor.mode} {tensor.name!r} is {tensor.dtype}, the manifest expects float32")
        if tensor.shape is None or tensor.shape[1:] != shape[1:] or not _takes_batches(tensor.shape, tensor.batches,
                                                                                           max_batch):
            raise BackendError(f"{what} {tensor.mode} {tensor.name!r} has shape {_shown(tensor)}, the manifest "
                               f"expects {shape} (-1: the dynamic batch axis, taking 1..{max_batch})")


def _takes_batches(shape: tuple[int, ...], batches: tuple[int, int | None], max_batch: int) -> bool:
    """Whether the batch axis of `shape` is dynamic and takes every size in 1..max_batch."""
    if not shape or shape[0] != DYNAMIC:
        return False
    low, high = batches
    return low <= 1 and (high is None or high >= max_batch)


def _shown(tensor: TensorInfo) -> str:
    """The tensor's shape as the message says it: a bounded batch axis as low..high."""
    if tensor.shape is None:
        return "of unknown rank"
    dims = [str(d) for d in tensor.shape]
    if dims and tensor.shape[0] == DYNAMIC and tensor.batches[1] is not None:
        dims[0] = f"{tensor.batches[0]}..{tensor.batches[1]}"
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
