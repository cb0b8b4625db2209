"""``--config FILE`` and ``--print-config`` for the training commands.

A configuration file holds a command's settings under their option names (``"epochs": 30``,
``"view_crop": "shift"``, the names ``--print-config`` prints), as JSON or YAML. The file is read
before the command line and its values become the command's defaults, so a flag given on the
command line always wins over the file, wherever it stands. Each value goes through the option's own type and choices, as if it
had been typed, so a file cannot smuggle in what the command line would refuse. The image folder,
``--out`` and how a run is watched (``--resume``, ``--no-progress``, ``--tensorboard``) are not settings: they stay on
the command line. Every training run saves its resolved settings as ``OUT/settings.json``, which
``--config`` reads back.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from calibclust.cli_names import DeprecatedAlias, deprecated_dests, device_arg, device_syntax, warn_deprecated
from calibclust.errors import InputError

# Where a run reads and writes, and how it is watched: given per invocation, never from a file.
NOT_SETTINGS = frozenset({"folder", "out", "config", "print_config", "resume", "no_progress", "verbose", "func",
                          "stop_after_epochs", "tensorboard"})
SETTINGS_FILE = "settings.json"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("settings file")
    g.add_argument("--config", metavar="FILE",
                   help="read settings from a JSON or YAML file (keys: the option names that --print-config prints, "
                        "e.g. \"epochs\": 30); options given on the command line override the file")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as JSON and exit without training (save them for --config; "
                        "null = the command's own default). Give the command's required arguments as for a run")
    parser.set_defaults(_settings_parser=parser)


def _settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions
            if a.dest not in NOT_SETTINGS and a.dest != argparse.SUPPRESS and not a.dest.startswith("_")
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction, DeprecatedAlias))}


def settings_of(args: argparse.Namespace) -> dict:
    """The resolved settings of a parsed command (JSON-ready, in the parser's option order)."""
    parser = getattr(args, "_settings_parser", None)
    if parser is None:
        return {}
    out = {}
    for dest in _settings_actions(parser):
        value = getattr(args, dest, None)
        out[dest] = list(value) if isinstance(value, tuple) else value
    return out


def _read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"--config {path}: not valid YAML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--config {path}: not valid JSON ({exc}); YAML files need a .yaml or .yml name") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _convert(action: argparse.Action, value, path: str):
    """A file value checked as the command line would check it: the option's type, then its choices."""
    option = action.option_strings[-1] if action.option_strings else action.dest
    if value is None:
        if action.required:
            raise InputError(f"--config {path}: {action.dest} ({option}) is required; null does not give it")
        return action.default  # null = the command's own default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise InputError(f"--config {path}: {action.dest} ({option}) must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) and action.choices is not None:
        # YAML 1.1 reads unquoted yes/no/on/off as booleans; give back the word the option expects.
        words = [w for w in (("yes", "on", "true") if value else ("no", "off", "false")) if w in action.choices]
        if words:
            value = words[0]
    if action.type is None and not isinstance(value, str):
        value = str(value)  # what the command line would have passed (e.g. device: 0)
    if action.type is device_arg:
        # Only the spelling: a file written on a GPU machine stays usable with --device cpu here;
        # argparse checks the device itself when the command line does not override it.
        try:
            return device_syntax(value)
        except argparse.ArgumentTypeError as exc:
            raise InputError(f"--config {path}: {action.dest} ({option}): {exc}") from None
    if action.type is not None:
        try:
            value = action.type(value if isinstance(value, str) else (
                "..".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
        except (ValueError, TypeError, argparse.ArgumentTypeError, InputError) as exc:
            raise InputError(f"--config {path}: {action.dest} ({option}): {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise InputError(f"--config {path}: {action.dest} ({option}) must be one of "
                         f"{', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _config_path(argv: list[str]) -> str | None:
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    return path


def load_config_defaults(leaf: argparse.ArgumentParser, argv: list[str]) -> None:
    """Before argparse reads ``argv``: make the ``--config`` file's settings the defaults of the
    command's parser ``leaf`` (so options the file gives are no longer required, and the command
    line, parsed afterwards, wins)."""
    path = _config_path(argv)
    if path is None or leaf.get_default("_settings_parser") is not leaf:
        return  # no file, or a command without --config (argparse then names the unknown option)
    data = _read(path)
    renamed = deprecated_dests(leaf)
    for old in [key for key in data if key in renamed and renamed[key] not in data]:
        warn_deprecated(leaf.prog, f"setting {old!r} in --config {path}", repr(renamed[old]))
        data[renamed[old]] = data.pop(old)
    actions = _settings_actions(leaf)
    unknown = sorted(set(data) - set(actions))
    if unknown:
        not_here = sorted(set(unknown) & NOT_SETTINGS)
        hint = f" ({', '.join(not_here)}: give on the command line)" if not_here else ""
        raise InputError(f"--config {path}: unknown setting(s) {', '.join(unknown)}{hint}; "
                         f"this command's settings: {', '.join(actions)}")
    values = {dest: _convert(actions[dest], value, path) for dest, value in data.items()}
    for dest in values:
        actions[dest].required = False  # the file gives it
    leaf.set_defaults(**values)


def check_config_was_read(args: argparse.Namespace, argv: list[str]) -> None:
    """argparse accepts ``--conf`` for ``--config``; the early scan reads only the full spelling."""
    given = getattr(args, "config", None)
    if given is not None and given != _config_path(argv):
        raise InputError("write --config in full (an abbreviated --config is not read)")


def save_settings(args: argparse.Namespace) -> None:
    """Write the resolved settings beside a finished run's outputs (``OUT/settings.json``). A resumed
    run keeps the file its first call wrote (pretrain leaves resumed settings unset: they come from
    its checkpoint); under torchrun only rank 0 writes."""
    if os.environ.get("RANK", "0") != "0":
        return
    out = getattr(args, "out", None)
    if getattr(args, "resume", False) and out and (Path(out) / SETTINGS_FILE).is_file():
        return
    settings = settings_of(args)
    if settings and out and Path(out).is_dir():
        (Path(out) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
