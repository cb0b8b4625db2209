"""The ``calibclust`` command.

Subcommands register themselves through the ``calibclust.commands`` entry-point group: each
entry point names a ``register_cli(subparsers)`` function in a module that imports nothing
heavy at module level, so ``calibclust --help`` never loads torch, onnx, tensorrt or gradio.

Exit codes (EXIT_* below): 0 ok, 1 failure, 2 bad usage, 3 finished with some inputs failed.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from calibclust import __version__
from calibclust.errors import CalibclustError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibclust",
        description=(
            "Calibrated deep clustering of image folders: train CDC/SPICE models, export them "
            "to ONNX/TensorRT, and label new folders with confidence-based rejection and OOD flags."
        ),
        epilog="Run 'calibclust COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"calibclust {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="calibclust.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:
            # One broken or half-installed plugin must not take every other command down with it.
            print(f"calibclust: command {ep.name!r} unavailable ({exc})", file=sys.stderr)
            continue
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except CalibclustError as exc:
        print(f"calibclust {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"calibclust {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
