"""The artifact formats a bundle holds: which files make up each one, and how its files are checked beyond their sha256.

Torch-free and runtime-free: `models.bundle` reads and verifies every artifact through `format_rules` (one table,
no branch per format). A runtime must read only the files the manifest lists and `verify_files` checked, so a format
whose runtime would read a file of its own choosing has a rule here that refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.onnx_wire import onnx_external_locations


class FormatError(ValueError):
    """An artifact's files do not make up its format (one line; the caller names the artifact)."""


class UnreadableFile(Exception):
    """A file of an artifact could not be read while its format was checked."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


def _no_check(paths: list[Path]) -> None:
    """Formats whose runtime reads exactly the files it is handed need no check beyond the sha256."""


@dataclass(frozen=True)
class Format:
    """One artifact format: its required files and the check of their content."""

    name: str
    # Exactly one file of each suffix and nothing else; () = any files (an ONNX model may have external data files).
    suffixes: tuple[str, ...] = ()
    # Called with the artifact's verified paths; raises FormatError or UnreadableFile.
    verify: Callable[[list[Path]], None] = _no_check


def _ir_xml(paths: list[Path]) -> None:
    """The .xml of an OpenVINO IR must be IR XML: OpenVINO opens an ONNX (or other) model saved under that name with
    another frontend, which reads files of its own (ONNX external data) that no manifest lists."""
    xml = next(p for p in paths if p.name.endswith(".xml"))
    try:
        with open(xml, "rb") as f:
            head = f.read(256).removeprefix(b"\xef\xbb\xbf").lstrip()
    except OSError as exc:
        raise UnreadableFile(xml, exc) from None
    if not head.startswith((b"<?xml", b"<net")):
        raise FormatError(f"{xml} is not OpenVINO IR XML (tampered or corrupt)")


def _onnx_external_data(paths: list[Path]) -> None:
    """Every external-data file an ONNX model of the artifact names must be one of its listed, verified files (the
    runtime would read it beside the model, unchecked: it decides the weights)."""
    listed = set(paths)
    for model in (p for p in paths if p.name.endswith(".onnx")):
        try:
            locations = onnx_external_locations(model)
        except ValueError as exc:
            raise FormatError(f"{model} is not a readable ONNX model ({exc})") from None
        except OSError as exc:
            raise UnreadableFile(model, exc) from None
        for location in sorted(locations):
            try:
                target = (model.parent / location).resolve()
            except (ValueError, OSError, RuntimeError):  # a NUL byte, a link loop: not a listed file either way
                target = None
            if target not in listed:
                raise FormatError(f"{model.name} takes tensor data from {location!r:.80}, which the manifest does "
                                  "not list (every file a runtime reads must be listed)")


# OpenVINO reads the weights named after the .xml unless it is handed the listed .bin: an IR is one .xml and one .bin.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", verify=_onnx_external_data),
    Format("openvino-ir", suffixes=(".xml", ".bin"), verify=_ir_xml),
    Format("tensorrt-engine"),
    Format("safetensors"),
)}


def format_rules(name: str) -> Format:
    """The rules of format `name`; a format not in the table (a test's fake runtime) has none."""
    return FORMATS.get(name) or Format(name)


def files_problem(name: str, paths: list[str]) -> str | None:
    """Why these file paths do not make up format `name` (None: they do, or the format has no suffix rule)."""
    suffixes = format_rules(name).suffixes
    if not suffixes:
        return None
    if len(paths) == len(suffixes) and all(sum(p.endswith(s) for p in paths) == 1 for s in suffixes):
        return None
    return (f"must list exactly one {' and one '.join(suffixes)} file (format {name!r}), lists "
            f"{', '.join(repr(p[-60:]) for p in paths[:4])}{', ...' if len(paths) > 4 else ''}")
