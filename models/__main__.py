"""`python -m models list [--json] [--bookkeeping paper|released]`: the variant and complexity table."""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import json

from models.cli import OneLineParser
from models.complexity import BOOKKEEPINGS
from models.table import format_table, variant_rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and print the table."""
    parser = OneLineParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="print every variant with its analytic complexity (1000 classes)")
    lst.add_argument("--json", action="store_true", help="a JSON array of objects instead of a text table")
    lst.add_argument(
        "--bookkeeping", choices=BOOKKEEPINGS, default="paper",
        help="paper: reproduces the published table (default); released: the later reference code's counting",
    )
    args = parser.parse_args(argv)
    rows = variant_rows(args.bookkeeping)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, "python -m models")
