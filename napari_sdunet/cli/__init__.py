"""The ``napari-sdunet`` command. Each submodule of this package adds one subcommand.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func=<callable(args) -> int>``. Modules are found automatically, so adding a command means adding
a file here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sdunet",
        description="Spatially Dependent U-Nets for medical image segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"napari-sdunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: a message, not a traceback
        print(f"napari-sdunet: error: {e}", file=sys.stderr)
        return 1
