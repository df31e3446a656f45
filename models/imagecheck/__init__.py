"""Each format's structure checks, made before Pillow opens a file (`check_structure`) and on an opened image's EXIF
block (`check_exif`): files built to make the decoder work far more than their pixels warrant are refused, each
refusal a `DecodeError` of one line naming the count and the bound. Imports PIL (its own tables of what it reads)."""

from __future__ import annotations

from models.imagecheck.avif import AVIF_BRANDS, check_avif
from models.imagecheck.gif_bmp import GIF_SIGNATURES, check_gif, check_rle_bmp
from models.imagecheck.jpeg import check_jpeg
from models.imagecheck.png import PNG_SIGNATURE, check_png
from models.imagecheck.tiff import TIFF_PREFIXES, check_exif, check_tiff

__all__ = ["check_exif", "check_structure", "signed_format"]

AVIF_OWN_BRANDS = (b"avif", b"avis")  # the brands only an AVIF has (mif1 and msf1 start HEIF files too)


def signed_format(data: bytes) -> str | None:
    """The format whose signature `data` begins with (JPEG's SOI marker, PNG's signature, RIFF....WEBP, GIF87a or
    GIF89a, BM, a TIFF or BigTIFF header, an ftyp box of an AVIF brand), whether or not the rest is sound; None for
    none of them."""
    signed = {"JPEG": data[:2] == b"\xff\xd8", "PNG": data[:8] == PNG_SIGNATURE,
              "WEBP": data[:4] == b"RIFF" and data[8:12] == b"WEBP", "GIF": data[:6] in GIF_SIGNATURES,
              "BMP": data[:2] == b"BM", "TIFF": data[:4] in TIFF_PREFIXES,
              "AVIF": data[4:8] == b"ftyp" and data[8:12] in AVIF_OWN_BRANDS}
    return next((fmt for fmt, yes in signed.items() if yes), None)


def check_structure(data: bytes) -> None:
    """Refuse files built to make the decoder work far more than their pixels warrant: thousands of tiny JPEG header
    segments or PNG chunks (parsed one by one in Python), of progressive scans (each a pass over the image), of JPEG
    EXIF segments (joined one by one), of PNG colour profiles (each inflated, up to 1 MiB), of TIFF strips, tiles,
    directory entries or EXIF numbers, of GIF blocks before the first image, of AVIF items or EXIF numbers, or RLE
    BMP data (decoded in Python); and a PNG any chunk of which is cut off, has no valid type or fails its checksum
    (CRC), naming the chunk."""
    if data[:2] == b"\xff\xd8":
        check_jpeg(data)
    elif data[:8] == PNG_SIGNATURE:
        check_png(data)
    elif data[:4] in TIFF_PREFIXES:
        check_tiff(data)
    elif data[:6] in GIF_SIGNATURES:
        check_gif(data)
    elif data[:2] == b"BM":
        check_rle_bmp(data)
    elif data[4:8] == b"ftyp" and data[8:12] in AVIF_BRANDS:
        check_avif(data)
