"""The ``napari-sdunet`` command. Each submodule of this package adds one subcommand.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func=<callable(args) -> int>``. Modules are found automatically, so adding a command means adding
a file here.

Errors a user can cause (the package's :class:`~napari_sdunet.errors.SdunetError`, bad values, files
that are missing, exist already or cannot be written, out of memory) end the command with one
``napari-sdunet: error: ...`` line and exit status 1, never a traceback. Ctrl-C and SIGTERM stop it
the same way (status 130 / 143); every file is written atomically, so none is left half-written.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import threading

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds like Ctrl-C (cleanup runs)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def user_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (keep the traceback)."""
    from ..errors import SdunetError

    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
        first = (str(e).splitlines() or [""])[0]
        return f"out of memory{f' ({first})' if first else ''}; use smaller inputs, a smaller --batch-size or the CPU"
    if isinstance(e, OSError) and e.strerror:  # e.g. "out/a.png: permission denied"
        return f"{e.filename}: {e.strerror.lower()}" if e.filename else e.strerror
    if isinstance(e, OSError):
        return str(e) or type(e).__name__
    if isinstance(e, (SdunetError, ValueError)):
        return str(e) or type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("napari-sdunet: terminated (SIGTERM); nothing half-written was left behind", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("napari-sdunet: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # user errors: a message, not a traceback
        msg = user_message(e)
        if msg is None:
            raise
        print(f"napari-sdunet: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
