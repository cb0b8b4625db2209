"""The ``calibclust`` command.

Subcommands register themselves through the ``calibclust.commands`` entry-point group: each
entry point names a ``register_cli(subparsers)`` function in a module that imports nothing
heavy at module level, so ``calibclust --help`` never loads torch, onnx, tensorrt or gradio.

Exit codes (EXIT_* below): 0 ok, 1 failure, 2 bad usage, 3 finished with some inputs failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

from calibclust import __version__
from calibclust.cli_config import check_config_was_read, load_config_defaults, save_settings, settings_of
from calibclust.cli_names import add_deprecated_aliases, resolve_legacy_model
from calibclust.errors import CalibclustError

from calibclust.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE


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
    add_deprecated_aliases(parser)
    return parser


def _command(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The leading words of ``argv`` that name subcommands, level by level, and the last parser."""
    words = [parser.prog]
    for token in argv:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or token not in sub.choices:
            break
        words.append(token)
        parser = sub.choices[token]
    return words, parser


def command_name(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """The full command a user typed (``calibclust train cdc``), for error messages."""
    return " ".join(_command(parser, argv)[0])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    words, leaf = _command(parser, argv)
    name = " ".join(words)
    try:
        load_config_defaults(leaf, argv)
    except CalibclustError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    resolve_legacy_model(args, leaf)
    try:
        check_config_was_read(args, argv)
        if getattr(args, "print_config", False):
            print(json.dumps(settings_of(args), indent=2))
            return EXIT_OK
        code = int(args.func(args) or EXIT_OK)
        if code in (EXIT_OK, EXIT_PARTIAL):
            save_settings(args)
        return code
    except CalibclustError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
