"""Turn images into a model's input tensor exactly as the server does, for clients of /v2 or of Triton.

`python -m serve.tensor --bundle exports/animals-vit_c sample.png --out x.bin` writes the raw binary request body
(little-endian FP32, `Inference-Header-Content-Length: 0`); `.npy` writes the array, `.json` a whole Open Inference
Protocol request. A Triton repository's version directory (`repo/<model>/1`) is a bundle too.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import json
from pathlib import Path

import numpy as np

from models.bundle import BundleError, Manifest, read_manifest
from models.cli import InputError, OneLineParser, command, int_in, write_failed
from models.config import MAX_IMAGE_PIXELS
from models.io import atomic_write_bytes, empty_path_problem, out_file_problem, replace_refused, same_file
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS

PROG = "python -m serve.tensor"
FORMATS = (".bin", ".npy", ".json")
DRAFT_POLICIES = ("measured", "always", "never")
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # the largest body the server can be set to take is bigger; an image is not


class TensorError(InputError, ValueError):
    """A bundle, image or output the tool cannot use (one line, exit 2)."""


def image_tensor(manifest: Manifest, data: bytes, *, jpeg_draft: bool = False,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image bytes -> the model's (1, C, H, W) float32 input, through the server's own decoding and preprocessing;
    raises serve.imaging.ImageError for an image the server would refuse."""
    from serve.imaging import prepare  # PIL: only when an image is made

    return prepare(data, manifest.preprocessing, max_pixels=max_pixels, jpeg_draft=jpeg_draft)


def request_json(manifest: Manifest, batch: np.ndarray) -> bytes:
    """An Open Inference Protocol infer request body carrying `batch` (floats written so they read back exactly)."""
    doc = {"inputs": [{"name": manifest.input.name, "shape": list(batch.shape), "datatype": "FP32",
                       "data": batch.ravel().tolist()}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def encode(manifest: Manifest, batch: np.ndarray, suffix: str) -> bytes:
    """The bytes of `batch` in the output format named by `suffix` (.bin, .npy or .json)."""
    if suffix == ".bin":
        return batch.astype("<f4", copy=False).tobytes()
    if suffix == ".json":
        return request_json(manifest, batch)
    import io

    buf = io.BytesIO()
    np.save(buf, batch.astype("<f4", copy=False), allow_pickle=False)
    return buf.getvalue()


def _read_image(path: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise TensorError(f"{path} is not a file")
        if size > MAX_IMAGE_BYTES:
            raise TensorError(f"{path} is {size} bytes; an image may have at most {MAX_IMAGE_BYTES}")
        with p.open("rb") as f:
            return f.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise TensorError(f"cannot read {path}: {exc.strerror or exc}") from None


def _model_dir(bundle: str) -> tuple[Path, str]:
    """The directory the model's files live in, and what to call it: the bundle, or for a Triton version directory
    (repo/<model>/1) the model directory above it, which holds its config.pbtxt."""
    path = Path(bundle)
    if _is_file(path.parent / "config.pbtxt"):  # unreadable: read_manifest says why the bundle fails
        return path.parent, "the Triton model directory"
    return path, "the bundle"


def _is_file(path: Path) -> bool:
    """Path.is_file, False where it cannot be looked at (Python 3.11 raises EACCES for a closed parent)."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_out(out: str, bundle: str, images: list[str], *, overwrite: bool = False) -> None:
    """TensorError unless `out` may be written: a new file (an existing one only with `overwrite`), never one of
    the input `images` nor a path inside the model's directory (its manifest or weights would be replaced)."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise TensorError(f"--out {out!r} must end in {', '.join(FORMATS)} (raw binary body, numpy array, "
                          "or a JSON infer request)")

    def refused(path: Path) -> str | None:
        if image := next((i for i in images if same_file(path, i)), None):
            return f"--out {out} is the input image {image}; give another path"
        return None if overwrite else replace_refused("--out", out)

    harm = "the model's own files would be replaced; give a path outside it"
    if problem := out_file_problem(out, "x" + suffix, inside=(*_model_dir(bundle), harm), existing=refused):
        raise TensorError(problem)


def build(bundle: str, images: list[str], out: str, *, jpeg_draft: str = "measured",
          max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, overwrite: bool = False) -> tuple[Manifest, tuple[int, ...]]:
    """Write the input tensor of `images` for `bundle`'s model to `out` (an existing file only with `overwrite`);
    returns (the manifest, the tensor's shape); raises TensorError, or WorkFailed when the machine fails the write."""
    from serve.imaging import ImageError

    check_out(out, bundle, images, overwrite=overwrite)  # before any image is decoded
    suffix = Path(out).suffix.lower()
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        hint = ""
        if _is_file(Path(bundle) / "config.pbtxt"):
            hint = f" (a Triton model directory: give one of its version directories, such as {Path(bundle) / '1'})"
        raise TensorError(f"--bundle: {exc}{hint}") from None
    if len(images) > manifest.input.max_batch:
        raise TensorError(f"{len(images)} images, but the model takes at most {manifest.input.max_batch} per "
                          "request (its export's max batch)")
    draft = manifest.jpeg_draft(jpeg_draft)
    rows = []
    for path in images:
        try:
            rows.append(image_tensor(manifest, _read_image(path), jpeg_draft=draft, max_pixels=max_pixels))
        except ImageError as exc:
            raise TensorError(f"{path}: {exc.reason}") from None
    batch = np.concatenate(rows)
    try:
        atomic_write_bytes(out, encode(manifest, batch, suffix))
    except OSError as exc:
        if failed := write_failed(exc, out):  # a full disk is the machine failing (exit 1), not the input
            raise failed from None
        raise TensorError(f"--out {out}: cannot write it: {exc.strerror or exc} (nothing was written)") from None
    return manifest, batch.shape


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Run `python -m serve.tensor`; returns the exit code (2 with one line on stderr for bad input)."""
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one batch row each, in order")
    p.add_argument("--bundle", required=True,
                   help="the model's bundle (or a Triton repository's version directory, repo/<model>/1)")
    p.add_argument("--out", required=True, help="file to write: .bin (raw binary request body, little-endian FP32), "
                   ".npy, or .json (a whole /v2 infer request)")
    p.add_argument("--jpeg-draft", choices=DRAFT_POLICIES, default="measured",
                   help="decode big JPEGs in draft mode as a server with this --jpeg-draft does (default measured)")
    p.add_argument("--max-image-pixels", type=int_in(1, MAX_IMAGE_PIXELS), default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"refuse larger images, as the server does (default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (never an input image "
                   "or a file of the model)")
    args = p.parse_args(argv)
    # Path("") is the current directory: `--bundle "$MODEL"` with MODEL unset would use whatever bundle lies here.
    if problem := empty_path_problem("--bundle", args.bundle, "give the model's bundle directory (or a Triton "
                                     "repository's version directory, repo/<model>/1)"):
        p.error(problem)
    manifest, shape = build(args.bundle, args.images, args.out, jpeg_draft=args.jpeg_draft,  # TensorError: exit 2
                            max_pixels=args.max_image_pixels, overwrite=args.overwrite)
    dims = " × ".join(map(str, shape))
    send = "send it with 'Inference-Header-Content-Length: 0'"
    if shape[0] > 1:
        send += " (a raw body is one image unless the model's max_batch_size is 0)"
    how = {".bin": send, ".npy": "load it with numpy.load",
           ".json": "POST it to /v2/models/<name>/infer"}[Path(args.out).suffix.lower()]
    print(f"wrote {args.out}: FP32 {dims} for input {manifest.input.name!r} of {manifest.name}; {how}")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
