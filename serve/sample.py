"""Write one validation image of an embedded dataset as a PNG, to try the service with.

`python -m serve.sample --dataset animals --out sample.png` prints the image's true label.
"""

from __future__ import annotations

import argparse
import sys

from models.io import atomic_write_bytes


def write_sample(dataset: str, index: int, out: str) -> str:
    """Save val image `index` of `dataset` to `out` (PNG); returns its label."""
    import io

    from data.datasets import DatasetError, load_dataset

    try:
        val = load_dataset(dataset, "val")
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not 0 <= index < len(val):
        raise SystemExit(f"error: --index must be in 0..{len(val) - 1}")
    buf = io.BytesIO()
    val.image(index).save(buf, "PNG")
    atomic_write_bytes(out, buf.getvalue())
    return val.class_names[int(val.labels[index])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.sample", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="animals", help="animals (default), mnist or digits")
    p.add_argument("--index", type=int, default=0, help="which validation image (default 0)")
    p.add_argument("--out", default="sample.png", help="PNG to write (default sample.png)")
    args = p.parse_args(argv)
    label = write_sample(args.dataset, args.index, args.out)
    print(f"wrote {args.out}: {args.dataset} val #{args.index}, label {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
