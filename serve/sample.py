"""Write one validation image of a dataset (embedded, or an ImageNet-layout folder) to try the service with.

`python -m serve.sample --dataset animals --out sample.png` prints the image's true label.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
from pathlib import Path

from models.cli import InputError, OneLineParser, command, write_failed
from models.io import atomic_write_bytes, empty_path_problem, out_file_problem, replace_refused

PROG = "python -m serve.sample"
MAX_SKIPPED = 64  # corrupt files passed over to find a readable one (a sample, not a training run: then stop)


class SampleError(InputError, ValueError):
    """A dataset, index or output path that cannot give a sample (one line, exit 2)."""


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}  # the encoders' largest image side (libjpeg, libwebp)


def check_out(out: str, dataset: str, *, overwrite: bool = False) -> None:
    """SampleError unless `out` can be written, checked before the data is loaded: a file name of an image format
    the file system takes, not inside the dataset folder, not a directory (the rename onto it would fail last), and
    new unless `overwrite` (as serve.tensor: whatever is there may be someone's picture)."""
    from data.datasets import EMBEDDED

    # Written into the folder, the sample would be read back as one more image of whichever class it landed in.
    harm = "the image would become part of the data; choose a path outside it"
    inside = None if dataset in EMBEDDED else (dataset, "the dataset folder", harm)
    existing = None if overwrite else lambda _path: replace_refused("--out", out)
    if problem := out_file_problem(out, "sample.png", inside=inside, existing=existing):
        raise SampleError(problem)
    if Path(out).suffix.lower() not in FORMATS:  # the bytes follow the name: a client sends the matching type
        raise SampleError(f"--out {out!r} must end in {', '.join(FORMATS)} (the image format to write)")


def write_sample(dataset: str, index: int, out: str, *, overwrite: bool = False) -> tuple[int, str]:
    """Save val image `index` of `dataset` to `out` (PNG, JPEG or WebP, by its extension; an existing file only with
    `overwrite`), or the next one that decodes when it does not (as training replaces a corrupt file), as the pixels
    a model trained on `dataset` sees; returns (the index written, its label); raises SampleError, or WorkFailed when
    the machine fails the write (a full disk)."""
    import io

    from data.datasets import DatasetError, default_preprocessing, load_dataset
    from models.failures import out_of_memory
    from models.preprocessing import to_mode
    from runtimes.base import first_line

    check_out(out, dataset, overwrite=overwrite)
    fmt = FORMATS[Path(out).suffix.lower()]
    try:
        # val/'s own classes: a sample is labelled by its directory's name, whatever a train/ beside it holds.
        val = load_dataset(dataset, "val", match_train=False)
        if not 0 <= index < len(val):
            raise SampleError(f"--index must be in 0..{len(val) - 1}, got {index}")
        # At most MAX_SKIPPED files are tried past a corrupt one: the search is bounded, not the whole folder.
        chosen = val.readable(range(index, min(len(val), index + MAX_SKIPPED + 1)), 1)
        image = chosen.images.image(0)
    except DatasetError as exc:
        raise SampleError(str(exc)) from None
    written = index + len(chosen.skipped)
    # The colour space training gives a model of this dataset (the size plays no part in it), and the conversion
    # training, evaluation and the server share: 16/32-bit and float grey scaled to 8 bits, alpha composited on
    # black. Saved as decoded, a float TIFF cannot be written at all, and a 16-bit or RGBA image as JPEG or WebP
    # would carry other pixels (saturated, alpha dropped) than the ones the model saw at validation.
    mode = default_preprocessing(dataset, 224).mode
    what = f"val #{written} ({image.mode} {image.size[0]}x{image.size[1]}): cannot write it as {fmt}"
    limit = MAX_SIDE.get(fmt)
    if limit is not None and max(image.size) > limit:  # said here: libjpeg would print to stderr first
        raise SampleError(f"{what}: more than {limit} pixels a side; write a .png")
    buf = io.BytesIO()
    try:
        to_mode(image, mode).save(buf, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))  # PNG: exact
    except (OSError, ValueError) as exc:  # an image the encoder refuses, or float pixels that are NaN
        if out_of_memory(exc):  # the machine failing: one line and exit 1 (models.cli.run)
            raise
        raise SampleError(f"{what}: {first_line(exc)}") from None
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as exc:  # read-only or virtual file system, no permission, a file in the path
        if failed := write_failed(exc, out):  # the machine failing (a full disk): one line naming it, exit 1
            raise failed from None
        raise SampleError(f"--out {out}: cannot write it: {exc.strerror or exc} (nothing was written)") from None
    return written, chosen.images.class_names[int(chosen.images.labels[0])]


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Run `python -m serve.sample`; returns the exit code (2 with one line on stderr for bad input)."""
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="animals", help="animals (default), mnist, digits or an ImageNet-layout folder")
    p.add_argument("--index", type=int, default=0, help="which validation image (default 0)")
    p.add_argument("--out", default="sample.png",
                   help="image to write: .png, .jpg/.jpeg or .webp, the format follows (default sample.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    args = p.parse_args(argv)
    # Path("") is the current directory: it was called "a directory", as though one had been named.
    if problem := empty_path_problem("--out", args.out, "give an image file name, or omit --out for sample.png"):
        p.error(problem)
    index, label = write_sample(args.dataset, args.index, args.out, overwrite=args.overwrite)  # SampleError: exit 2
    skipped = f" ({index - args.index} unreadable from val #{args.index} on, skipped)" if index != args.index else ""
    print(f"wrote {args.out}: {args.dataset} val #{index}{skipped}, label {label}")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
