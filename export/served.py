"""Served-path parity: real validation images, encoded as users send them, through a real server, against the
evaluation pipeline on the dataset's own pixels.

The export's parity gate compares tensors. This sends every image, in the model's colour space as the shared
`to_mode` converts it, as PNG at its own size and as JPEG (quality 95 and 75) at 2x, 4x and 8x the model's resize
target, to `python -m serve` (HTTP, decoding, EXIF, JPEG draft decoding, preprocessing, dynamic batching, runtime),
once with JPEG draft decoding and once without, and compares top-1 with the torch reference on the original pixels.
An image that the server the check starts would refuse in any encoding is left out of every encoding (so all are
measured on the same images), named and counted in the progress line, as unreadable files are: one too long to be a
JPEG at 8x (libjpeg: 65,500 pixels a side, a strip of about 32:1 for a 224-pixel model), or with more pixels than
the server's --max-image-pixels (40 M: 8x the 256-pixel resize target of a 224-pixel model is past 9.5:1).
The result goes into the bundle's manifest (`served`); when draft decoding costs more than DRAFT_BUDGET_POINTS of
accuracy, servers decode that model's JPEGs in full.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.bundle import (
    DRAFT_BUDGET_POINTS,
    MIN_DRAFT_SAMPLES,
    BundleError,
    Manifest,
    ServedParity,
    read_manifest,
    write_manifest,
)
from models.oneline import first_line
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, Preprocessing
from runtimes.registry import DEFAULT_RUNTIME

if TYPE_CHECKING:
    import PIL.Image

QUALITIES = (95, 75)
SCALES = (2, 4, 8)  # JPEG sizes, in multiples of the model's resize target: where draft decoding kicks in
CONCURRENCY = 8
JPEG_MAX_SIDE = 65500  # libjpeg's largest image side
MAX_BODY_BYTES = 16 * 2**20  # serve's --max-body-bytes default, raised to the largest body `measure` sends


def encodings(img: PIL.Image.Image, spec: Preprocessing) -> dict[str, bytes]:
    """name -> encoded bytes: PNG at the image's own size, JPEG at each quality and size, of the image's pixels in
    the model's colour space (`spec.mode`); ValueError or OSError when they cannot be encoded."""
    from PIL import Image

    from models.failures import out_of_memory
    from models.preprocessing import to_mode

    def encode(im: PIL.Image.Image, fmt: str, **kw: int) -> bytes:
        if fmt == "JPEG" and max(im.size) > JPEG_MAX_SIDE:  # said here: libjpeg prints it to stderr, PIL an OSError
            raise ValueError(f"JPEG {im.size[0]}x{im.size[1]}: more than {JPEG_MAX_SIDE} pixels a side")
        buf = io.BytesIO()
        try:
            im.save(buf, fmt, **kw)
        except (OSError, ValueError) as exc:
            if out_of_memory(exc):
                raise
            raise ValueError(f"{fmt} {im.size[0]}x{im.size[1]}: {first_line(exc)}") from None
        return buf.getvalue()

    # The shared conversion, as training, evaluation and the server apply it (16/32-bit and float grey scaled to
    # 8 bits, alpha composited on black): a 16-bit PNG or an RGBA image then reaches the server as the pixels the
    # model sees (PNG and JPEG hold 8 bits, no float, and JPEG no alpha). It is per pixel, so the server's
    # preprocessing of the PNG equals the evaluation pipeline's on the original exactly.
    pixels = to_mode(img, spec.mode)
    out = {"png-native": encode(pixels, "PNG")}
    for scale in SCALES:
        side = spec.resize * scale
        big = pixels.resize(_scaled(pixels.size, side), Image.Resampling.BICUBIC)
        for q in QUALITIES:
            out[f"jpeg{q}-{side}"] = encode(big, "JPEG", quality=q)
    return out


def _scaled(size: tuple[int, int], side: int) -> tuple[int, int]:
    """`size` scaled so that its shorter side is `side`."""
    w, h = size
    return round(w * side / min(w, h)), round(h * side / min(w, h))


def too_long_for_jpeg(size: tuple[int, int], spec: Preprocessing) -> tuple[int, int] | None:
    """The largest JPEG `encodings` would make of an image of `size`, when a side of it is over libjpeg's
    JPEG_MAX_SIDE (a strip or panorama longer than about 32:1 for a 224-pixel model), else None."""
    big = _scaled(size, spec.resize * max(SCALES))
    return big if max(big) > JPEG_MAX_SIDE else None


def _sizes(size: tuple[int, int], spec: Preprocessing) -> list[tuple[str, tuple[int, int]]]:
    """(encoding, size) of every encoding `encodings` makes of an image of `size`, smallest JPEG first."""
    return [("as a PNG at its own size", size)] + [
        (f"as a JPEG at {s}x the resize target", _scaled(size, spec.resize * s)) for s in SCALES]


def too_many_pixels(size: tuple[int, int], spec: Preprocessing,
                    max_pixels: int | None = None) -> tuple[str, tuple[int, int]] | None:
    """The first encoding (what, size) of an image of `size` with more pixels than the server's limit `max_pixels`
    (default DEFAULT_MAX_IMAGE_PIXELS, the one `measure` starts it with), which it would answer 413, else None."""
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    return next(((what, (w, h)) for what, (w, h) in _sizes(size, spec) if w * h > limit), None)


def _refusal(size: tuple[int, int], spec: Preprocessing) -> tuple[str, str] | None:
    """Why an encoding of an image of `size` could not be sent to the server `measure` starts, as (reason, how
    this image meets it), else None. The JPEG side limit first: such a JPEG cannot even be made."""
    if big := too_long_for_jpeg(size, spec):
        return (f"too long to send as a JPEG at {max(SCALES)}x the resize target (more than {JPEG_MAX_SIDE} pixels "
                "a side"), f"would be {big[0]}x{big[1]}"
    if over := too_many_pixels(size, spec):
        what, (w, h) = over
        return (f"too big for the server's pixel limit (more than {DEFAULT_MAX_IMAGE_PIXELS} pixels, its "
                "--max-image-pixels"), f"would be {w}x{h} = {w * h} pixels {what}"
    return None


def _sendable(images: list, spec: Preprocessing, where: Callable[[int], str]) -> tuple[list[int], str]:
    """The indices of the images that every encoding can be made of and sent, and a note ("" or ", k left out
    ...") on the others. A valid image that the server would refuse in any encoding (`_refusal`) is left out of
    the whole measurement (so every encoding is measured on the same images), named and counted as unreadable
    files are, not fatal; before any image is encoded or any server started."""
    keep: list[int] = []
    out: dict[str, list[tuple[int, str]]] = {}  # reason -> (index, how), in the order first met
    for i, img in enumerate(images):
        if refused := _refusal(img.size, spec):
            out.setdefault(refused[0], []).append((i, refused[1]))
        else:
            keep.append(i)
    whys = []
    for reason, hits in out.items():
        i, how = hits[0]
        w, h = images[i].size
        whys.append((len(hits), f"{reason}; {where(i)} {w}x{h} {how}"
                     + (f", and {len(hits) - 1} more" if len(hits) > 1 else "") + ")"))
    if not keep and len(whys) == 1:
        raise ServedError(f"no val image to measure: all {whys[0][0]} chosen are {whys[0][1]}")
    if not keep and whys:
        raise ServedError(f"no val image to measure: all {len(images)} chosen are left out, "
                          + ", ".join(f"{n} as {why}" for n, why in whys))
    return keep, "".join(f", {n} left out as {why}" for n, why in whys)


def _encode_all(images: list, spec: Preprocessing, where: Callable[[int], str]) -> list[dict[str, bytes]]:
    """`encodings` of every image; ServedError naming the image (`where(i)`) that cannot be encoded."""
    from models.failures import out_of_memory

    encoded = []
    for i, img in enumerate(images):
        try:
            encoded.append(encodings(img, spec))
        except (OSError, ValueError) as exc:
            if out_of_memory(exc):  # the machine failing, not the image (exit 1)
                raise
            raise ServedError(f"cannot encode val image {where(i)} ({img.mode} {img.size[0]}x{img.size[1]}) as "
                              f"the PNG and JPEG a client sends: {first_line(exc)}") from None
    return encoded


def _classify(url: str, name: str, bodies: list[bytes]) -> list[int]:
    """Top-1 class index of every body, CONCURRENCY requests at a time (so they batch as in production)."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    path = f"/v1/models/{urllib.parse.quote(name)}/classify?top_k=1"

    def one(chunk: list[bytes]) -> list[int]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        out = []
        for body in chunk:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            doc = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"the server answered {r.status}: {doc.get('error')}")
            out.append(int(doc["predictions"][0]["index"]))
        conn.close()
        return out

    chunks = [bodies[i::CONCURRENCY] for i in range(CONCURRENCY)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, chunks))
    merged = [0] * len(bodies)
    for i, res in enumerate(results):
        merged[i::CONCURRENCY] = res
    return merged


def _reference_runtime(manifest: Manifest) -> str:
    """Where the evaluation pipeline's reference runs: torch when the bundle and this machine have it, else the
    fp32 ONNX file in onnxruntime."""
    import runtimes

    return "torch" if manifest.servable("torch") and runtimes.get("torch").installed() else "onnxruntime"


def _reference(bundle: Path, manifest: Manifest, images: list[PIL.Image.Image]) -> np.ndarray:
    """Top-1 of the evaluation pipeline: the dataset's pixels, the shared preprocessing, torch (or the fp32 ONNX)."""
    import runtimes
    from models.preprocessing import preprocess

    backend = runtimes.open_backend(bundle, manifest, _reference_runtime(manifest), "fp32")
    try:
        step = manifest.input.max_batch
        return np.concatenate([backend.infer(preprocess(images[i:i + step], manifest.preprocessing)).argmax(1)
                               for i in range(0, len(images), step)])
    finally:
        backend.close()


class ServedError(ValueError):
    """The served path cannot be measured for this bundle (one line)."""


def check(bundle: Path, manifest: Manifest, runtime: str) -> None:
    """Refuse, before any work, what would make `measure` fail after minutes of it: an unknown or missing runtime,
    no servable artifact for it, no fp32 reference, an unknown dataset, a manifest that cannot be rewritten."""
    import runtimes
    from data.datasets import load_labelled
    from runtimes import BackendError

    rt = runtimes.get(runtime)  # BackendError: unknown, with the known ones
    rt.require("cpu")  # BackendError: not installed here (the server runs on its default device)
    runtimes.select(manifest, rt)  # BundleError: no servable artifact for it
    reference = runtimes.get(_reference_runtime(manifest))
    try:
        reference.require("cpu")
        runtimes.select(manifest, reference, "fp32")
    except (BackendError, BundleError) as exc:
        raise ServedError(f"the evaluation pipeline's reference ({reference.name} fp32) cannot run: "
                          f"{exc}") from None
    # DatasetError (a ValueError): unknown or unreadable, or a class the model lacks (named)
    load_labelled(manifest.source.dataset, "val", manifest.class_names)
    target = bundle / "manifest.json"
    try:  # the record is written through a temp file beside the manifest, then renamed over it
        with tempfile.TemporaryFile(dir=bundle):
            pass
        if not os.access(bundle, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ServedError(f"cannot record the result in {target}: {exc.strerror or exc} (the bundle must be "
                          "writable)") from None


def measure(bundle: str | Path, runtime: str = DEFAULT_RUNTIME, samples: int | None = None,
            log: Callable[[str], None] = print) -> ServedParity:
    """Measure the served path of `bundle` on `runtime` and record it in its manifest; returns the record."""
    from data.datasets import EVAL_SUBSET_SEED, load_labelled
    from models.failures import disk_full, out_of_memory
    from serve.launch import start

    # The server runs in the repository (serve.launch): a path relative to the caller's directory must not reach it.
    bundle = Path(os.path.abspath(bundle))
    manifest = read_manifest(bundle)
    # Labelled as the model's classes, by name: the server answers the model's indices, and a folder (export's
    # --dataset) may hold some of them in another order, where its own index k is not the model's k.
    val = load_labelled(manifest.source.dataset, "val", manifest.class_names)
    # Drawn as the export's parity images are, corrupt files left out and counted as everywhere else.
    chosen = val.readable_subset(samples or len(val), seed=EVAL_SUBSET_SEED)
    images = [chosen.images.image(i) for i in range(len(chosen.images))]
    paths = chosen.images.paths
    keep, left_out = _sendable(images, manifest.preprocessing, lambda i: str(paths[i]) if paths else f"#{i}")
    images, labels = [images[i] for i in keep], np.asarray(chosen.images.labels)[keep]
    paths = [paths[i] for i in keep] if paths else paths
    log(f"{manifest.name}: {len(images)} {manifest.source.dataset} val images{chosen.note()}{left_out}, reference "
        f"on their own pixels ...")
    # Encoded before the reference runs: an image that cannot be sent is named, before minutes of work.
    encoded = _encode_all(images, manifest.preprocessing, lambda i: str(paths[i]) if paths else f"#{i}")
    reference = _reference(bundle, manifest, images)
    names = list(encoded[0])
    # A PNG of a big photo (up to 40 M pixels, about 120 MB) is over the server's default body limit (16 MiB): the
    # limits are the check's own, given as flags (not VITC_* from the environment), and let every body through. The
    # pixel limit is serve's default, the one `_sendable` kept images by: VITC_MAX_IMAGE_PIXELS cannot refuse them.
    body_limit = max(MAX_BODY_BYTES, *(len(body) for e in encoded for body in e.values()))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vitc-served-") as tmp:
        for draft in (True, False):
            args = ["--model", f"m={bundle}", "--backend", runtime, "--no-access-log", "--max-queue-delay-ms", "2",
                    "--max-image-pixels", str(DEFAULT_MAX_IMAGE_PIXELS), "--max-body-bytes", str(body_limit)]
            policy = ["--jpeg-draft", "always" if draft else "never"]
            with start(args + policy, Path(tmp) / f"server-{draft}.log") as server:
                for enc in names:
                    if not draft and not enc.startswith("jpeg"):
                        continue
                    log(f"  {enc}{'' if draft else ' (no draft)'} ...")
                    top1 = np.asarray(_classify(server.url, "m", [e[enc] for e in encoded]))
                    key = "accuracy" if draft else "accuracy_no_draft"
                    entry = results.setdefault(enc, {})
                    entry[key] = float((top1 == labels).mean())
                    if draft:
                        entry["agreement"] = float((top1 == reference).mean())
    cost = max((100 * (v["accuracy_no_draft"] - v["accuracy"]) for v in results.values() if "accuracy_no_draft" in v),
               default=0.0)
    record = ServedParity(runtime=runtime, samples=len(images),
                          reference_accuracy=float((reference == labels).mean()), encodings=results,
                          jpeg_draft_cost_points=round(cost, 3),
                          jpeg_draft=cost <= DRAFT_BUDGET_POINTS and len(images) >= MIN_DRAFT_SAMPLES,
                          created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    try:
        write_manifest(bundle, replace(read_manifest(bundle), served=record))
    except OSError as exc:
        if disk_full(exc) or out_of_memory(exc):  # the machine failing (exit 1), not the bundle
            raise
        raise ServedError(f"cannot record it in {bundle / 'manifest.json'}: {exc.strerror or exc}") from None
    return record


def table(record: ServedParity) -> str:
    """The served-path record as Markdown."""
    lines = [f"Served path ({record.runtime}, {record.samples} val images; evaluation pipeline top-1 "
             f"{record.reference_accuracy:.2%}): JPEG draft decoding costs {record.jpeg_draft_cost_points:+.2f} "
             f"points at most -> {'kept' if record.jpeg_draft else 'off for this model'} "
             f"(budget {DRAFT_BUDGET_POINTS} points"
             + (f"; {record.samples} images cannot show that, {MIN_DRAFT_SAMPLES} can"
                if record.samples < MIN_DRAFT_SAMPLES else "") + ")", "",
             "| encoding | accuracy | top-1 agreement with the reference | accuracy without draft |",
             "|---|---|---|---|"]
    for enc, v in record.encodings.items():
        no_draft = f"{v['accuracy_no_draft']:.2%}" if "accuracy_no_draft" in v else "-"
        lines.append(f"| {enc} | {v['accuracy']:.2%} | {v['agreement']:.2%} | {no_draft} |")
    return "\n".join(lines)
