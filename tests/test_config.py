"""The one config base (calibclust.config): strict from_dict / to_dict with nested configs, every
problem in one error, the fields --resume may change; and the command-line options generated from
the fields (calibclust.cli_config.ConfigOptions): each default is the field's, every field is an
option or listed as not one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from calibclust.config import Config, ConfigError
from calibclust.errors import InputError


@dataclass
class Inner(Config):  # for the option generator's own test (annotations resolve at module level)
    p: float = 0.5
    mode: str = "a"


@dataclass
class Outer(Config):
    steps: int = 10
    rate: float | None = None
    fast: bool = True
    size: int | None = 128
    inner: Inner = field(default_factory=lambda: Inner(mode="b"))


def test_every_problem_is_reported_at_once_nested_ones_by_path():
    from calibclust.train.cdc import CDCConfig

    with pytest.raises(ConfigError) as info:
        CDCConfig(num_clusters=1, epochs=-1, heads="triple")
    message = str(info.value)
    assert message.startswith("invalid CDC configuration: ")
    assert all(p in message for p in ("num_clusters must be >= 2", "epochs must be >= 0", "heads must be one of"))
    assert len(info.value.problems) == 3
    # also a ValueError for Python callers, and an InputError (exit code 2) on the command line
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)

    with pytest.raises(ConfigError, match=r"views\.flip_p must be in \[0, 1\], got 2; views\.num_ops must be >= 0"):
        CDCConfig.from_dict({"views": {"flip_p": 2, "num_ops": -1}})
    with pytest.raises(ConfigError) as info:  # nested and top-level problems in the same message
        CDCConfig(num_clusters=1, views={"flip_p": 2})
    assert info.value.problems == ["views.flip_p must be in [0, 1], got 2", "num_clusters must be >= 2, got 1"]

    import pickle

    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries (bench children, Ray)
    assert str(again) == str(info.value) and again.problems == info.value.problems


def test_from_dict_refuses_unknown_keys_and_round_trips_through_json():
    from calibclust.pretrain import MoCoConfig
    from calibclust.train.cdc import CDCConfig
    from calibclust.train.spice import SpiceConfig

    with pytest.raises(ConfigError, match=r"unknown setting\(s\) epoch, lr_head \(known: num_clusters, epochs"):
        CDCConfig.from_dict({"epoch": 3, "lr_head": 0.1})
    # unknown keys and invalid values together: both in the one message
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) typo .*; momentum μ must be in \[0, 1\)"):
        MoCoConfig.from_dict({"typo": 1, "momentum": 2.0})
    for config in (CDCConfig(num_clusters=4, views={"crop": "resized"}), SpiceConfig(num_clusters=3),
                   MoCoConfig(augment={"zoom_out_p": 0.5, "rotation": 10.0})):
        again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config, type(config).__name__  # tuples come back as tuples, nested configs as configs
    assert CDCConfig.from_dict({"views": {"crop": "resized"}}).views.crop_scale == (0.08, 1.0)


def test_resume_names_every_changed_setting_except_resumable_ones():
    from calibclust.pretrain import MoCoConfig
    from calibclust.train.cdc import CDCConfig

    saved = json.loads(json.dumps(CDCConfig(num_clusters=3, epochs=10).to_dict()))
    CDCConfig(num_clusters=3, epochs=20).check_resume(saved)  # more epochs: CDC's RESUMABLE
    with pytest.raises(InputError, match=r"than the checkpoint in x: batch_size \(1000 → 500\), lr_heads"):
        CDCConfig(num_clusters=3, batch_size=500, lr_heads=0.1).check_resume(saved, "the checkpoint in x")
    old = {k: v for k, v in saved.items() if k != "minicluster_norm"}  # a checkpoint older than the option
    CDCConfig(num_clusters=3, epochs=10).check_resume(old)
    MoCoConfig(checkpoint_every_steps=5).check_resume(MoCoConfig().to_dict())
    with pytest.raises(InputError, match="the checkpoint in x was saved with settings this version cannot read"):
        CDCConfig(num_clusters=3).check_resume({**saved, "from_the_future": 1}, "the checkpoint in x")


def test_cli_defaults_are_the_configs_defaults():
    """With no options, `train cdc`, `train spice`, `train kmeans` and `pretrain` build exactly the
    config's defaults, except the differences listed (and said in --help)."""
    from calibclust.cli import build_parser
    from calibclust.pretrain import MoCoConfig, config_from_args
    from calibclust.train.cdc import CDCConfig
    from calibclust.train.cli import _config_from_args
    from calibclust.train.kmeans_method import KMeansConfig, KMeansMethod
    from calibclust.train.spice import SpiceConfig
    from calibclust.train.spice_cli import spice_config_from_args

    parser = build_parser()
    cdc = _config_from_args(parser.parse_args(["train", "cdc", "f", "--out", "o", "--clusters", "3"])).to_dict()
    paper = CDCConfig(num_clusters=3).to_dict()
    # the command resolves the encoder lr the config leaves to --difficulty (a run resumes with the value it used)
    differ = {k for k in paper if cdc[k] != paper[k]}
    assert differ == {"lr_backbone"}, {k: (cdc[k], paper[k]) for k in differ}

    spice = spice_config_from_args(parser.parse_args(["train", "spice", "f", "--out", "o", "--clusters", "3"]))
    differ = {k for k, v in SpiceConfig(num_clusters=3).to_dict().items() if spice.to_dict()[k] != v}
    assert not differ, differ

    args = parser.parse_args(["train", "kmeans", "f", "--out", "o", "--clusters", "3"])
    assert KMeansMethod(args.clusters, seed=args.seed).config == KMeansConfig(num_clusters=3)

    moco = config_from_args(parser.parse_args(["pretrain", "f", "--out", "o"]))
    assert moco == MoCoConfig()


def _generated_options():
    """(command, action, table, field path) of every option generated from a config field."""
    from calibclust.cli import build_parser
    from calibclust.cli_names import command_of, walk_parsers

    for parser in walk_parsers(build_parser()):
        for action in parser._actions:
            if hasattr(action, "config_option"):
                yield (command_of(parser), action, *action.config_option)


def test_generated_options_take_their_defaults_from_the_fields():
    """An option's default is its field's, except where a command deliberately has its own (listed here,
    with the reason beside them in the code); a flag leaves the field's default when absent; an unset
    option (None: the command resolves it) still shows the field's default where its help names one."""
    from calibclust.cli_config import field_default
    from calibclust.train.cli import ABLATION_DEFAULTS

    deliberate = {"train cdc-ablation": ABLATION_DEFAULTS,  # ten quick rows
                  "train compare": {"cdc_epochs": 40, "cdc_batch_size": 300}}  # every method in minutes on a CPU
    seen = set()
    for command, action, table, path in _generated_options():
        seen.add(command)
        option = table.options[path]
        default, _ = field_default(table.config, path)
        where = f"{command} {action.option_strings[0]} ({table.config.__name__}.{path})"
        if action.dest in deliberate.get(command, {}):
            assert action.default == deliberate[command][action.dest] != default, where
        elif action.nargs == 0:  # a flag: absent leaves the field's default, given sets the other value
            assert action.default is False and action.const is True, where
        elif table.unset or option.unset:
            assert action.default is None, where
        else:
            assert action.default == default and type(action.default) is type(default), where
        if "%(default)s" in option.help and action.default is None:
            assert str(default) in action.help, where  # the value the run gets, not "None"
    assert {"pretrain", "train cdc", "train cdc-ablation", "train spice", "train compare", "train kmeans"} <= seen, seen


def test_every_config_field_is_an_option_or_listed_as_not_one():
    """Each command's table covers every field of its config: an option, or a reason it has none."""
    from calibclust.cli_config import field_paths
    from calibclust.pretrain import MOCO_OPTIONS
    from calibclust.train.cli import ABLATED, CDC_OPTIONS
    from calibclust.train.spice_cli import SPICE_OPTIONS, VIEW_OPTIONS

    for table in (CDC_OPTIONS, SPICE_OPTIONS, VIEW_OPTIONS, MOCO_OPTIONS):
        fields = set(field_paths(table.config))
        name = table.config.__name__
        assert not set(table.options) & set(table.not_options), name
        assert set(table.options) | set(table.not_options) == fields, (
            name, sorted(fields - set(table.options) - set(table.not_options)),
            sorted((set(table.options) | set(table.not_options)) - fields))

    by_command: dict[str, set] = {}
    for command, action, table, path in _generated_options():
        by_command.setdefault(command, set()).add((table, path))
    options = {table: {(table, path) for path in table.options} for table in (CDC_OPTIONS, SPICE_OPTIONS, VIEW_OPTIONS,
                                                                              MOCO_OPTIONS)}
    assert options[CDC_OPTIONS] <= by_command["train cdc"]
    assert options[CDC_OPTIONS] - by_command["train cdc-ablation"] == {(CDC_OPTIONS, p) for p in ABLATED}
    for command in ("train spice", "train compare"):
        assert options[SPICE_OPTIONS] | options[VIEW_OPTIONS] <= by_command[command], command
    assert options[MOCO_OPTIONS] <= by_command["pretrain"]


def test_options_from_fields_flags_unset_nested_and_a_base():
    """The generator on a config of its own: types and defaults from the fields, boolean flags, an
    unset option, a nested field, a converted value, and values applied on a saved config."""
    import argparse

    from calibclust.cli_config import ConfigOptions, FieldOption, build_config

    table = ConfigOptions(Outer, {
        "steps": FieldOption("steps (default %(default)s)", unset=True),
        "rate": FieldOption("rate"),
        "fast": FieldOption("slow", flag="--slow"),
        "size": FieldOption("size (default %(default)s)", type=lambda t: t if t == "all" else int(t),
                            convert=lambda v: None if v == "all" else v),
        "inner.p": FieldOption("no p", flag="--no-p", sets=0.0),
        "inner.mode": FieldOption("mode (default %(default)s)", choices=("a", "b")),
    }, not_options={})
    parser = argparse.ArgumentParser()
    table.add(parser, *table.options)
    actions = {a.dest: a for a in parser._actions}
    assert actions["steps"].default is None and actions["steps"].help == "steps (default 10)"
    assert actions["rate"].type is float and actions["size"].default == 128 and actions["slow"].default is False
    assert actions["mode"].default == "b"  # the enclosing field's default, not Inner's own

    assert build_config(Outer, table.values(parser.parse_args([]))) == Outer()
    given = table.values(parser.parse_args(["--steps", "3", "--slow", "--size", "all", "--no-p", "--mode", "a"]))
    assert given == {"steps": 3, "fast": False, "size": None, "inner.p": 0.0, "inner.mode": "a"}
    assert build_config(Outer, given) == Outer(steps=3, fast=False, size=None, inner=Inner(p=0.0, mode="a"))
    saved = Outer(steps=7, rate=0.1, inner=Inner(p=0.2, mode="a"))  # e.g. a resumed run's settings
    assert build_config(Outer, table.values(parser.parse_args(["--mode", "b"])), base=saved) == Outer(
        steps=7, rate=0.1, size=128, inner=Inner(p=0.2, mode="b"))

    with pytest.raises(ValueError, match="would set Outer.inner.p to its default"):
        ConfigOptions(Outer, {"inner.p": FieldOption("p", flag="--p", sets=0.5)}).add(argparse.ArgumentParser(), "inner.p")
    with pytest.raises(KeyError, match="Outer has no field 'step'"):
        ConfigOptions(Outer, {"step": FieldOption("x")}).add(argparse.ArgumentParser(), "step")


def test_help_shows_the_fields_defaults():
    from calibclust.cli import main

    for argv, shown in ((["pretrain"], ["images are resized to PX×PX (default 32)", "(default resnet34)",
                                        "(default 0.03)", "(default mocov2;"]),
                        (["train", "cdc"], ["epochs (default 100)", "batch B (default 1000, or by --paper-setting)",
                                            "(default shift)"]),
                        (["train", "cdc-ablation"], ["epochs (default 30)"]),
                        (["train", "spice"], ["Adam lr of the heads (default 0.005)", "(default 128)"]),
                        (["train", "compare"], ["CDC epochs (default 40)", "(default 2000, the authors'"])):
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(out.getvalue().split())
        for phrase in shown:
            assert phrase in text, (argv, phrase)
