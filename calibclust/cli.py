"""The ``calibclust`` command.

calibclust's own subcommands are the static table :data:`COMMANDS`: each names a
``register_cli(subparsers)`` function in a module that imports nothing heavy at module level, so
``calibclust --help`` never loads torch, onnx, tensorrt or gradio. Other packages add commands
through the ``calibclust.commands`` entry-point group (same kind of function), registered after
these; a plugin cannot replace one of them.

Exit codes (EXIT_* below): 0 ok, 1 failure, 2 bad usage, 3 finished with some inputs failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from importlib.metadata import entry_points

from calibclust import __version__
from calibclust.cli_config import check_config_was_read, load_config_defaults, save_settings, settings_of
from calibclust.cli_names import add_deprecated_aliases, resolve_legacy_model
from calibclust.errors import CalibclustError

from calibclust.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE


# (name, "module:function"): the function adds one command, or targets/methods to a command group
# (``bench-label`` adds ``bench label``, ``bench-zoo`` adds ``bench zoo``: a bench that runs ``fit`` belongs to
# the application layer, which the core's ``bench`` module may not import); registered in this order (the order of `calibclust --help`); `train`
# before `train-spice`, which attaches `train spice` and `train compare` to the train group, and
# `bench` before the modules that add bench targets.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("bench", "calibclust.bench:register_cli"),
    ("bench-zoo", "calibclust.app.zoo_bench:register_cli"),
    ("bench-label", "calibclust.serve.bench:register_bench_label"),
    ("bench-model", "calibclust.export.cli:register_bench_cli"),
    ("demo", "calibclust.serve.demo:register_cli"),
    ("embed", "calibclust.embed:register_cli"),
    ("evaluate", "calibclust.evaluate:register_cli"),
    ("exemplars", "calibclust.serve.exemplars_cli:register_cli"),
    ("export", "calibclust.export.cli:register_cli"),
    ("fit", "calibclust.app.fitting:register_cli"),
    ("label", "calibclust.serve.cli:register_cli"),
    ("predict", "calibclust.train.cli:register_predict_cli"),
    ("pretrain", "calibclust.pretrain:register_cli"),
    ("quickstart", "calibclust.app.quickstart:register_cli"),
    ("train", "calibclust.train.cli:register_cli"),
    ("train-spice", "calibclust.train.spice_cli:register_cli"),
)
PLUGIN_GROUP = "calibclust.commands"


def _load(target: str):
    module_name, _, function = target.partition(":")
    return getattr(import_module(module_name), function)


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
    own = {target for _, target in COMMANDS}
    plugins = [(ep.name, ep.value, ep.load) for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name)
               if ep.value not in own]  # (an install of calibclust before the table listed its own commands there)
    for name, target, load in [(n, t, lambda t=t: _load(t)) for n, t in COMMANDS] + plugins:
        try:
            register = load()
            register(subparsers)
        except (ImportError, argparse.ArgumentError) as exc:
            # One broken, half-installed or clashing module (a plugin taking a built-in command's
            # name) must not take every other command down with it.
            print(f"calibclust: command {name!r} unavailable ({exc})", file=sys.stderr)
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
