"""``--config FILE`` and ``--print-config`` for the training commands.

A configuration file holds a command's settings under their option names (``"epochs": 30``,
``"view_crop": "shift"``, the names ``--print-config`` prints), as JSON or YAML. The file is read
before the command line and its values become the command's defaults, so a flag given on the
command line always wins over the file, wherever it stands. Each value goes through the option's own type and choices, as if it
had been typed, so a file cannot smuggle in what the command line would refuse. The image folder,
``--out`` and how a run is watched (``--resume``, ``--no-progress``, ``--tensorboard``) are not settings: they stay on
the command line. Every training run saves its resolved settings as ``OUT/settings.json``, which
``--config`` reads back.

The options that set a config's fields are generated from the fields (:class:`ConfigOptions`):
their defaults are the fields' defaults, written once, in the config; a command keeps only each
option's spelling and help text, in a table keyed by field name.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable

from calibclust.cli_names import DeprecatedAlias, deprecated_dests, device_arg, device_syntax, warn_deprecated
from calibclust.config import Config, _hints
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


# --- options generated from a config's fields ------------------------------------------------------

_UNSET = object()  # "not given" for FieldOption's sets / default


@dataclasses.dataclass(frozen=True)
class FieldOption:
    """How one field of a :class:`~calibclust.config.Config` appears on a command line. Its default
    is not written here: it is the field's (see :class:`ConfigOptions`)."""

    help: str  # "%(default)s" shows the field's default, also for an option left unset
    flag: str | None = None  # the option's spelling; default --field-name
    metavar: str | None = None
    type: Callable | None = None  # default: int or float from the field's annotation; text as typed
    choices: tuple | None = None
    # The option's default is None ("not given") and the command resolves the value: from the
    # --resume checkpoint, --paper-setting, --joint-schedule, ... (else the field's default).
    unset: bool = False
    # A flag (store_true) that gives the field this value; a boolean field's flag gives the
    # opposite of its default.
    sets: Any = _UNSET
    convert: Callable | None = None  # the option's value -> the field's (e.g. "all" -> None)
    # A command's own default, where it deliberately differs from the field's (say why beside it).
    default: Any = _UNSET


class ConfigOptions:
    """The command-line options of the fields of one config class.

    ``options`` maps a field (``"views.crop"`` for a field of a nested config) to its
    :class:`FieldOption`; :meth:`add` adds the options a command has, where its help groups them,
    and :meth:`values` reads them back as field values for :func:`build_config`. ``not_options``
    names every other field with the reason it has no option here (another option sets it, or it
    is left to Python callers); ``None`` marks a table that covers a few fields only (the config's
    defaults, or the command, give the rest). ``unset`` leaves every option unset (pretrain: a
    resumed run keeps its checkpoint's settings)."""

    def __init__(self, config: type, options: dict[str, FieldOption], not_options: dict[str, str] | None = None,
                 unset: bool = False):
        self.config, self.options, self.not_options, self.unset = config, dict(options), not_options, unset

    def flag(self, path: str) -> str:
        return self.options[path].flag or "--" + path.rsplit(".", 1)[-1].replace("_", "-")

    def dest(self, path: str) -> str:
        return self.flag(path)[2:].replace("-", "_")  # what argparse makes of the flag

    def default(self, path: str) -> Any:
        return field_default(self.config, path)[0]

    def _flag_value(self, path: str) -> Any:
        """The value a flag gives its field; ``_UNSET`` for an option that takes a value."""
        option = self.options[path]
        default, kind = field_default(self.config, path)
        if option.sets is not _UNSET:
            return option.sets
        return (not default) if kind is bool else _UNSET

    def add(self, group, *paths: str) -> None:
        """Add the options of ``paths`` to ``group`` (a parser or an argument group), in this order."""
        for path in paths:
            option = self.options[path]
            default, kind = field_default(self.config, path)
            unset = self.unset or option.unset
            sets = self._flag_value(path)
            if sets is not _UNSET:
                if sets == default:
                    raise ValueError(f"{self.flag(path)} would set {self.config.__name__}.{path} to its default {default!r}")
                kwargs = {"action": "store_true"}
            else:
                kwargs = {"type": option.type or _option_type(kind, self.config, path),
                          "default": None if unset else default if option.default is _UNSET else option.default}
                if option.choices is not None:
                    kwargs["choices"] = option.choices
                if option.metavar is not None:
                    kwargs["metavar"] = option.metavar
            help = option.help
            if unset or sets is not _UNSET:
                # argparse would show None (or False): the field's default is what the run gets.
                help = help.replace("%(default)s", str(default))
            action = group.add_argument(self.flag(path), help=help, **kwargs)
            action.config_option = (self, path)  # tests/test_config.py finds the generated options by it

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The field values that ``args`` (parsed by a command these options were added to) gives,
        by field path. An option the command does not have, an unset option not given and a flag
        not given are absent: the config's default (or the base's value) stays."""
        out = {}
        for path, option in self.options.items():
            dest = self.dest(path)
            if not hasattr(args, dest):
                continue
            value, sets = getattr(args, dest), self._flag_value(path)
            if sets is not _UNSET:
                if value:
                    out[path] = sets
            elif value is not None:
                out[path] = option.convert(value) if option.convert else value
        return out


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return _hints(cls)  # evaluating the annotations is slow; the CLI asks for each option's


def field_paths(config: type) -> list[str]:
    """Every field of ``config``, a nested config's fields as ``views.crop``."""
    out = []
    hints = _field_hints(config)
    for f in dataclasses.fields(config):
        kind = hints.get(f.name)
        if isinstance(kind, type) and issubclass(kind, Config):
            out += [f"{f.name}.{sub}" for sub in field_paths(kind)]
        else:
            out.append(f.name)
    return out


def field_default(config: type, path: str) -> tuple[Any, Any]:
    """(default, annotation) of the field ``path`` of ``config``. A nested config's field
    (``views.crop``) has the value it has in the enclosing field's default."""
    value, kind, cls = None, None, config
    for depth, name in enumerate(path.split(".")):
        if depth:
            if not isinstance(value, Config):
                raise KeyError(f"{config.__name__}.{path}: {name!r} is not inside a nested config")
            cls = type(value)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise KeyError(f"{config.__name__} has no field {path!r}")
        kind = _field_hints(cls)[name]
        if depth:
            value = getattr(value, name)
        else:
            f = fields[name]
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return value, kind


def _option_type(kind: Any, config: type, path: str) -> Callable | None:
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    options = [o for o in options if o is not type(None)]
    if options == [int] or options == [float]:
        return options[0]
    if options == [str]:
        return None  # argparse passes the text as typed (what --config's conversion expects)
    raise TypeError(f"{config.__name__}.{path} ({kind}) needs a FieldOption type")


def build_config(config: type, values: dict[str, Any], base: Config | dict | None = None):
    """``config`` from field ``values`` (:meth:`ConfigOptions.values`, plus what a command resolves)
    on top of ``base`` (a config or its ``to_dict()``; default: the config's defaults). A nested
    field (``views.crop``) changes that one value of the nested config."""
    data = dict(base.to_dict() if isinstance(base, Config) else base or {})
    for path, value in values.items():
        name, _, rest = path.partition(".")
        if not rest:
            data[name] = value
            continue
        if "." in rest:
            raise ValueError(f"{config.__name__}.{path}: one level of nested configs is supported")
        nested = data.get(name)
        if nested is None:
            nested = field_default(config, name)[0]
        nested = nested.to_dict() if isinstance(nested, Config) else dict(nested)
        data[name] = {**nested, rest: value}
    return config.from_dict(data)
