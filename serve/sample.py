"""Write one validation image of an embedded dataset as a PNG, to try the service with.

`python -m serve.sample --dataset animals --out sample.png` prints the image's true label.
"""

from __future__ import annotations

import sys
from pathlib import Path

from models.cli import OneLineParser
from models.io import atomic_write_bytes

PROG = "python -m serve.sample"


class SampleError(ValueError):
    """A dataset, index or output path that cannot give a sample (one line, exit 2)."""


def write_sample(dataset: str, index: int, out: str) -> str:
    """Save val image `index` of `dataset` to `out` (PNG); returns its label; raises SampleError."""
    import io

    from data.datasets import DatasetError, load_dataset

    if Path(out).is_dir():  # checked before the data is loaded: the rename onto a directory would fail last
        raise SampleError(f"--out {out} is a directory; give a file name such as {Path(out) / 'sample.png'}")
    try:
        val = load_dataset(dataset, "val")
    except DatasetError as exc:
        raise SampleError(str(exc)) from None
    if not 0 <= index < len(val):
        raise SampleError(f"--index must be in 0..{len(val) - 1}, got {index}")
    buf = io.BytesIO()
    val.image(index).save(buf, "PNG")
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as exc:  # read-only or virtual file system, no permission, a file in the path
        raise SampleError(f"--out {out}: cannot write it: {exc.strerror or exc}") from None
    return val.class_names[int(val.labels[index])]


def main(argv: list[str] | None = None) -> int:
    """Run `python -m serve.sample`; returns the exit code (2 with one line on stderr for bad input)."""
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="animals", help="animals (default), mnist or digits")
    p.add_argument("--index", type=int, default=0, help="which validation image (default 0)")
    p.add_argument("--out", default="sample.png", help="PNG to write (default sample.png)")
    args = p.parse_args(argv)
    try:
        label = write_sample(args.dataset, args.index, args.out)
    except SampleError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.dataset} val #{args.index}, label {label}")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, "python -m serve.sample")
