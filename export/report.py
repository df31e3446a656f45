"""Parity report: one table across every artifact of a bundle, every file checked against its sha256.

Read from the manifest (no runtime needed); a corrupt artifact is marked CORRUPT, not servable, and exits 2; a full
disk while --served or --png writes exits 1.

`python -m export.report BUNDLE [BUNDLE ...] [--markdown] [--png parity.png [--overwrite]]`
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import io
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from models.bundle import BundleError, Manifest, read_manifest, verify_file, verify_files
from models.cli import InputError, OneLineParser, command, machine_error, refuse_empty_paths
from models.extras import require
from models.io import atomic_write_bytes, out_file_problem, out_inside_problem
from models.oneline import first_line, one_line
from runtimes.registry import DEFAULT_RUNTIME
from runtimes.registry import names as runtime_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROG = "python -m export.report"
# The text chunk every chart of this command carries: an existing --png holding it is an earlier chart, replaced as
# train.eval replaces an earlier result of its own (`make demo` writes the same chart on every run); anything else
# there is someone's file, replaced only with --overwrite.
CHART_KEY, CHART_TEXT = "vitc", "export.report parity chart"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHART_HEAD_BYTES = 1 << 16  # where the chart's text chunk lies: before the pixels, a few hundred bytes in
COLUMNS = ("artifact", "runtime", "size MB", "export s", "max abs err", "rel err", "top-1 agree", "accuracy",
           "torch acc", "Δacc pt", "batch inv", "precision hint", "status")


def integrity(bundle: Path, manifest: Manifest) -> dict[str, str]:
    """What is wrong with the bundle's files, one line each: "golden" (the golden inputs, or a manifest edited
    after export) and each servable artifact's id (a file missing, or not matching its sha256). Empty: all sound."""
    from runtimes.loader import check_contract, check_pre_golden, check_records, read_golden

    problems = {}
    if manifest.golden is None:
        try:  # a golden record deleted by hand, not a bundle from before golden inputs
            check_pre_golden(bundle, manifest)
        except BundleError as exc:
            problems["golden"] = first_line(exc)
    else:
        try:  # what every server reads before it loads an artifact
            path = verify_file(bundle, manifest.golden.file, "golden inputs")
            check_contract(path, manifest)
            read_golden(path, manifest)
            edited = check_records(path, manifest, [a.id for a in manifest.artifacts])
            problems.update({k or "golden": v for k, v in edited.items()})
        except BundleError as exc:
            problems["golden"] = first_line(exc)
    for a in manifest.servable():
        try:
            verify_files(bundle, a)
        except BundleError as exc:
            problems[a.id] = first_line(exc)
    return problems


def rows(manifest: Manifest, problems: dict[str, str] | None = None) -> list[list[str]]:
    """One formatted row per artifact (`problems`: what `integrity` found, by artifact id)."""
    out = []
    problems, known = problems or {}, runtime_names()
    for a in manifest.artifacts:
        p = a.parity.to_dict() if a.parity else {}
        size = sum(f.bytes for f in a.files or a.refused_files)

        def num(key: str, fmt: str, p: dict = p) -> str:
            return format(p[key], fmt) if isinstance(p.get(key), int | float) else "-"

        # With its paired 95 % interval and the images it was measured on: the gate judges a point estimate.
        delta = a.parity.delta_text() if a.parity else "-"
        status = (f"CORRUPT: {problems[a.id]}" if a.id in problems
                  # a server reads the golden inputs (and the manifest's record) before any artifact: none loads
                  else "not servable: the golden inputs (above)" if a.servable and "golden" in problems
                  # A newer vitc's runtime: no server here opens it, so it is not listed as servable.
                  else f"runtime {a.runtime} is not one this vitc knows" if a.servable and a.runtime not in known
                  else "servable" if a.servable else f"REFUSED: {a.refused_reason}")
        # A refusal reason or a runtime version is one line (models.bundle `_line`) written from a runtime's own
        # messages, which may hold a tab or an escape sequence: printed escaped, it cannot rewrite the terminal.
        out.append([one_line(cell) for cell in (
            a.id, f"{a.runtime} {a.runtime_version}".strip(), f"{size / 1e6:.2f}",
            f"{a.export_seconds:.1f}", num("max_abs_err", ".1e"), num("max_rel_err", ".1e"),
            num("top1_agreement", ".2%"), num("accuracy", ".2%"), num("reference_accuracy", ".2%"), delta,
            num("batch_invariance_max_abs", ".1e"), str(a.info.get("inference_precision", "-")), status,
        )])
    return out


def table(manifest: Manifest, markdown: bool = False, problems: dict[str, str] | None = None) -> str:
    """The report for one bundle as aligned text (or a Markdown table); `problems` as `integrity` finds them."""
    body = rows(manifest, problems)
    p = next((a.parity for a in manifest.artifacts if a.parity), None)
    hub = manifest.timings.get("onnx_hub_seconds")
    m, i = manifest, manifest.input
    measured = (f"parity on {p.val_samples} {p.dataset} val images, batch sizes {list(p.batch_sizes)}" if p
                else "no parity measured")
    # Escaped as the other free text is: the manifest's name refuses control and format characters (U+202E would
    # reverse the rest of the terminal line), but the parity's dataset, a folder's path, may hold a format character.
    title = one_line(f"{m.name}: {m.model} ({m.stem} stem), input {i.height}x{i.width}, batch 1..{i.max_batch}; "
                     f"{measured}" + (f"; torch->ONNX export {hub:.1f}s (shared)" if hub else ""))
    title += "\n" + provenance_line(m)
    if problems and "golden" in problems:
        title += f"\nCORRUPT: {one_line(problems['golden'])}"
    listed = {a.id for a in m.artifacts}
    for key, why in (problems or {}).items():  # an artifact the golden file records, the manifest no longer lists
        if key != "golden" and key not in listed:
            title += f"\nCORRUPT: {one_line(why)}"
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        out = title + "\n\n" + "\n".join(lines)
    else:
        widths = [max([len(c), *(len(r[i]) for r in body)]) for i, c in enumerate(COLUMNS)]  # body may be empty
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = "\n".join([title, fmt.format(*COLUMNS), *(fmt.format(*r) for r in body)])
    if m.served is not None:
        from export.served import table as served_table

        out += "\n\n" + served_table(m.served)
    return out


def provenance_line(m: Manifest) -> str:
    """Where the bundle came from, in one line (fingerprints shortened to 12 hex digits)."""
    p = m.provenance
    if p is None:
        return "provenance: not recorded (exported before vitc recorded it)"
    commit = f"{p.git_commit[:12]}{' (dirty)' if p.git_dirty else ''}" if p.git_commit else "unknown commit"
    short = {k: (v[:12] if v else "-") for k, v in (("config", p.training_config_sha256),
                                                     ("train", p.training_data_fingerprint),
                                                     ("parity", p.parity_data_fingerprint),
                                                     ("calibration", p.calibration_data_fingerprint))}
    # Escaped as a whole: the versions and fingerprints are one line each (models.bundle `_line`), not free of
    # escape sequences, and a Provenance built in code is not held to the reader's rules.
    return one_line(f"provenance: vitc {p.vitc_version} at {commit}; weights {m.source.sha256[:12]}; training "
                    f"config {short['config']}, data {short['train']}; parity data {short['parity']}; calibration "
                    f"data {short['calibration']}; training command: {p.training_command or '-'}")


def chart(manifests: list[Manifest]) -> Figure:
    """Bar chart of each artifact's top-1 accuracy next to torch's, one panel per bundle, every panel on the same
    0-100 % axis (a range fitted to each panel's bars made half a point look large, and panels look alike whatever
    their accuracy); each bar carries its value."""
    from models.plotting import pyplot

    fig, axes = pyplot().subplots(1, len(manifests), figsize=(5 * len(manifests), 3.5), squeeze=False)
    for ax, m in zip(axes[0], manifests, strict=True):
        arts = [a for a in m.artifacts if a.parity]
        acc = [a.parity.accuracy * 100 for a in arts]
        colors = ["tab:green" if a.servable else "tab:red" for a in arts]
        bars = ax.bar([a.id for a in arts], acc, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        if arts:
            ax.axhline(arts[0].parity.reference_accuracy * 100, color="k", ls="--", lw=1, label="torch fp32")
        ax.set_ylim(0, 105)  # room above 100 % for the labels
        ax.set_title(m.name)
        ax.set_ylabel("val top-1 %")
        ax.tick_params(axis="x", rotation=45)
        if arts:
            ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot(manifests: list[Manifest], path: Path) -> Path:
    """The chart of `chart` written to `path` as PNG."""
    from models.plotting import pyplot

    plt = pyplot()
    fig = chart(manifests)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={CHART_KEY: CHART_TEXT})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # a failed write leaves any old chart intact
    return path


def png_text(head: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG file's first bytes `head` that come before its pixels (keyword -> text); empty for
    what is no PNG. Never decoded: a chunk length that runs past `head` ends the walk."""
    if not head.startswith(PNG_SIGNATURE):
        return {}
    found, pos = {}, len(PNG_SIGNATURE)
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        if kind == b"IDAT":
            break
        body = head[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            key, _, text = body.partition(b"\0")
            found[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length  # length, type, data, CRC
    return found


def is_own_chart(path: Path) -> bool:
    """Whether `path` is a regular file this command wrote as its chart (its CHART_KEY text chunk), by its first
    bytes: a FIFO or a device is never opened."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return png_text(f.read(CHART_HEAD_BYTES)).get(CHART_KEY) == CHART_TEXT
    except OSError:
        return False


def _not_own_chart(path: Path) -> str | None:
    """Why the existing `path` must not be replaced without --overwrite: anything but an earlier chart of ours."""
    if is_own_chart(path):
        return None
    return (f"--png {path} already exists and is not a chart of {PROG}; nothing was changed: pass --overwrite to "
            "replace it, or give a new path")


def check_png(path: Path, bundles: Sequence[str] = (), *, overwrite: bool = False) -> str | None:
    """Why the chart cannot be written to `path` (None: it can), checked before any slow work: not a .png; inside
    one of `bundles` (the next export over it would refuse a file the bundle does not list); an existing file that
    is not an earlier chart of this command, unless `overwrite`; a place that cannot be written."""
    if path.suffix.lower() != ".png":
        return f"--png {path} must end in .png"
    harm = "the bundle would hold a file it does not list, and the next export over it refuses that; give a path " \
           "outside it"
    for bundle in bundles:
        if why := out_inside_problem(path, bundle, "the bundle", harm, flag="--png"):
            return why
    if problem := out_file_problem(path, "parity.png", existing=None if overwrite else _not_own_chart, flag="--png"):
        return problem
    if not path.parent.is_dir():
        return f"--png {path}: directory {path.parent} does not exist"
    try:  # the chart is written through a temp file beside it: that must work
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        return f"--png {path}: cannot write in {path.parent}: {exc.strerror or exc}"
    if path.exists() and not os.access(path, os.W_OK):
        return f"--png {path}: not writable"
    return None


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of every bundle given; exit 2 on a bad bundle."""
    ap = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="bundle directories")
    ap.add_argument("--markdown", action="store_true", help="Markdown tables (for the README)")
    ap.add_argument("--png", type=Path, help="also write an accuracy bar chart to this .png file: a new one, or an "
                                             "earlier chart of this command (anything else only with --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace --png whatever file it is (never a file inside "
                                                             "a bundle reported on)")
    ap.add_argument("--served", action="store_true",
                    help="also measure the served path (encoded images through a real server, JPEG draft on and "
                         "off) and record it in each bundle's manifest")
    ap.add_argument("--runtime", default=DEFAULT_RUNTIME, help="runtime for --served (default %(default)s)")
    ap.add_argument("--samples", type=int, help="validation images for --served, at least 1; more than the split "
                                                "holds means the whole split (default: the whole split)")
    args = ap.parse_args(argv)
    # Path("") is the current directory: `export.report "$BUNDLE"` with BUNDLE unset would report whatever is here.
    refuse_empty_paths(ap, (("BUNDLE", bundle, "give a bundle directory") for bundle in args.bundles))
    if args.samples is not None and args.samples < 1:
        ap.error(f"--samples must be at least 1, got {args.samples}")
    if args.png is not None:
        require("matplotlib")  # before the tables, not after them
    if args.png is not None and (why := check_png(args.png, args.bundles, overwrite=args.overwrite)):
        ap.error(why)
    if args.overwrite and args.png is None:
        ap.error("--overwrite applies to --png only")
    if not args.served and (args.runtime != DEFAULT_RUNTIME or args.samples is not None):
        ap.error("--runtime and --samples apply to --served only")
    try:
        manifests = [read_manifest(b) for b in args.bundles]
    except BundleError as exc:
        raise InputError(str(exc)) from None
    if args.served:
        manifests = _served(manifests, args)
    found = [integrity(Path(b), m) for m, b in zip(manifests, args.bundles, strict=True)]
    print("\n\n".join(table(m, args.markdown, p) for m, p in zip(manifests, found, strict=True)))
    if args.png:
        if why := check_png(args.png, args.bundles, overwrite=args.overwrite):  # again: --served took minutes
            raise InputError(why)
        try:
            print(f"plot: {plot(manifests, args.png)}", file=sys.stderr)  # stdout holds only the tables (--markdown)
        except OSError as exc:
            if failed := machine_error(exc, f"{args.png} was not written"):
                raise failed from None
            raise InputError(f"cannot write {args.png}: {exc.strerror or exc}") from None
    corrupt = [f"{b}: {', '.join(p)}" for b, p in zip(args.bundles, found, strict=True) if p]
    if corrupt:  # the table says what is wrong with each
        raise InputError(f"corrupt, will not load: {'; '.join(corrupt)}")
    return 0


def _served(manifests: list[Manifest], args: argparse.Namespace) -> list[Manifest]:
    """--served: each bundle's manifest with the served path measured and recorded; InputError when it cannot be."""
    from export.served import check, measure

    try:  # everything the measurement needs, before it starts (it takes minutes)
        for m, b in zip(manifests, args.bundles, strict=True):
            check(Path(b), m, args.runtime)
    except (BundleError, RuntimeError, ValueError) as exc:
        raise InputError(f"served path: {first_line(exc)}") from None
    try:
        return [replace(m, served=measure(b, args.runtime, args.samples, log=lambda msg: print(msg, file=sys.stderr)))
                for m, b in zip(manifests, args.bundles, strict=True)]
    except (BundleError, RuntimeError, ValueError) as exc:
        raise InputError(f"served path: {first_line(exc)}") from None
    except OSError as exc:  # a full disk (exit 1), or a file the measurement reads or writes
        if failed := machine_error(exc, "the served path was not recorded: the manifest of the bundle being "
                                        "measured is unchanged"):
            raise failed from None
        # Not necessarily the manifest (`measure` says so itself when writing it fails): say what failed, where.
        where = f": {exc.filename}" if exc.filename else ""
        raise InputError(f"served path: {exc.strerror or first_line(exc)}{where}") from None


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
