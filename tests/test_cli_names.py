"""The argparse tree against calibclust.cli_names: one spelling per concept, help on every option,
every ``--help`` example and every README command parses, old spellings still work (with a warning)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from calibclust.cli import build_parser, main
from calibclust.cli_names import (
    CANONICAL,
    DEPRECATED,
    LEGACY_MODEL,
    DeprecatedAlias,
    command_of,
    resolve_legacy_model,
    walk_parsers,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def _visible_options(parser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction,
                               DeprecatedAlias)) or action.help is argparse.SUPPRESS:
            continue
        yield action


def _leaves():
    return [p for p in walk_parsers(build_parser()) if command_of(p) and p.get_default("func") is not None]


def test_every_option_has_help_and_no_visible_option_uses_an_old_spelling():
    missing, old_spellings = [], []
    deprecated = {(old, command) for old, _, commands in DEPRECATED for command in commands}
    for parser in walk_parsers(build_parser()):
        for action in _visible_options(parser):
            if not (action.help or "").strip():
                missing.append(f"{command_of(parser)} {action.option_strings or action.dest}")
            for option in action.option_strings:
                if (option, command_of(parser)) in deprecated:
                    old_spellings.append(f"{command_of(parser)} {option}")
    assert not missing, f"options without help: {missing}"
    assert not old_spellings, f"old spellings still visible: {old_spellings}"


def test_one_spelling_per_concept_across_commands():
    """Every old spelling the table names is gone from every command (not only where it was seen), and
    each canonical spelling keeps one meaning: one dest wherever it appears."""
    olds = {old for old, _, _ in DEPRECATED}
    dests: dict[str, set[str]] = {}
    for parser in walk_parsers(build_parser()):
        for action in _visible_options(parser):
            for option in action.option_strings:
                dests.setdefault(option, set()).add(action.dest)
    # --device is Triton's instance kind under its old spelling only; elsewhere it is the torch device.
    assert not (olds - {"--device"}) & set(dests), sorted((olds - {"--device"}) & set(dests))
    for option in CANONICAL:
        assert option in dests, f"{option} is in the table but no command has it"
        assert len(dests[option]) == 1, f"{option} stands for several settings: {dests[option]}"


def _value_for(action) -> list[str]:
    """A command-line value this option accepts (none for flags)."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    for candidate in ("3", "0.5", "1,2,3", "x"):
        try:
            if action.type is not None:
                action.type(candidate)
            return [candidate]
        except (ValueError, TypeError, argparse.ArgumentTypeError, Exception):
            continue
    raise AssertionError(f"no sample value for {action.option_strings}")


def _minimal_argv(parser) -> list[str]:
    words = command_of(parser).split()
    positional = [a for a in parser._actions if not a.option_strings and a.dest != LEGACY_MODEL
                  and not isinstance(a, argparse._SubParsersAction)]
    required = [a for a in parser._actions if a.option_strings and a.required]
    argv = words + [v for a in positional for v in (_value_for(a) if a.nargs != "?" else [])]
    for action in required:
        argv += [action.option_strings[0], *_value_for(action)]
    if parser.get_default("_model_required"):
        argv += ["--model", "m"]
    return argv


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "_settings_parser"}  # a parser per build


def _parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    leaf = parser
    for word in argv:
        sub = next((a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        leaf = sub.choices[word]
    resolve_legacy_model(args, leaf)
    return args


@pytest.mark.parametrize("old,new,command", [(o, n, c) for o, n, cs in DEPRECATED for c in cs],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_old_spellings_still_work_with_a_warning(old, new, command, capsys):
    parser = next(p for p in walk_parsers(build_parser()) if command_of(p) == command)
    canonical = parser._option_string_actions[new]
    base, value = _minimal_argv(parser), _value_for(canonical)
    with_new = _settings(_parse(base + [new, *value]))
    assert "deprecated" not in capsys.readouterr().err
    with_old = _settings(_parse(base + [old, *value]))
    err = capsys.readouterr().err
    assert with_old == with_new, (old, new)
    assert f"{old} is deprecated" in err and f"use {new}" in err and f"calibclust {command}" in err, err


def test_model_as_a_positional_still_works_and_two_models_are_refused(capsys):
    args = _parse(["export", "onnx", "runs/cdc/model", "--images", "imgs", "--out", "m.onnx"])
    assert args.model == "runs/cdc/model"
    assert "--model runs/cdc/model" in capsys.readouterr().err
    args = _parse(["exemplars", "model.onnx", "imgs"])
    assert (args.model, args.folder) == ("model.onnx", "imgs")
    args = _parse(["exemplars", "imgs", "--model", "model.onnx"])
    assert (args.model, args.folder) == ("model.onnx", "imgs")
    with pytest.raises(SystemExit) as exc:
        _parse(["export", "triton", "a.onnx", "--model", "b.onnx", "--repo", "r"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        _parse(["export", "onnx", "--images", "imgs", "--out", "m.onnx"])
    assert "required: --model" in capsys.readouterr().err


def _commands_in(text: str) -> list[str]:
    """``calibclust ...`` command lines in help text or Markdown (continuations joined, comments cut)."""
    text = re.sub(r"\\\n\s*", " ", text)
    text = re.sub(r"\[(--[^\]|]*)\]", r"\1", text)  # README's [--optional value]: check it too
    found = []
    for line in text.splitlines():
        for part in line.split("&&"):
            part = part.strip()
            m = re.search(r"(?:^|-m )calibclust (.*)$", part)
            if part.startswith(("calibclust ", "torchrun ")) and m is not None:
                found.append(m.group(1))
    return found


def _help_examples():
    for parser in _leaves():
        for text in (parser.epilog or "", parser.description or ""):
            for command in _commands_in(text):
                yield command_of(parser), command


def _check_parses(command: str):
    argv = shlex.split(command, comments=True)
    try:
        _parse(argv)
    except SystemExit as exc:
        raise AssertionError(f"'calibclust {command}' does not parse (exit {exc.code})") from None


def test_every_help_example_parses(capsys):
    examples = list(_help_examples())
    assert len(examples) > 40, len(examples)
    for where, command in examples:
        _check_parses(command)
        err = capsys.readouterr().err
        assert "deprecated" not in err, f"calibclust {where} --help example uses an old spelling: {command}\n{err}"


def test_every_readme_command_parses(capsys):
    commands = [c for c in _commands_in(README.read_text(encoding="utf-8")) if not c.startswith("COMMAND")]
    assert len(commands) > 20, len(commands)
    for command in commands:
        _check_parses(command)
        err = capsys.readouterr().err
        assert "deprecated" not in err, f"README uses an old spelling: calibclust {command}\n{err}"


def test_device_errors_are_usage_errors_before_any_work(tmp_path, capsys):
    """A bad or unavailable --device stops at the command line (exit 2), before images are decoded."""
    import torch

    folder = tmp_path / "no-such-folder"  # were the images read first, this would be the error
    for command in (["train", "cdc", str(folder), "--clusters", "3"], ["train", "spice", str(folder), "--clusters", "3"],
                    ["pretrain", str(folder)], ["predict", str(folder), "--model", "m"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--out", str(tmp_path / "o"), "--device", "foo"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "'foo' is not a device" in err and f"calibclust {' '.join(command[:2] if command[0] == 'train' else command[:1])}" in err, err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["train", "cdc", str(folder), "--clusters", "3", "--out", str(tmp_path / "o"), "--device", "cuda"])
        assert "no CUDA GPU is usable" in capsys.readouterr().err


def test_compare_runs_spice_with_train_spice_defaults():
    parser = build_parser()
    spice = parser.parse_args(["train", "spice", "f", "--out", "o", "--clusters", "3"])
    compare = parser.parse_args(["train", "compare", "f", "--out", "o", "--clusters", "3"])
    shared = set(vars(spice)) & set(vars(compare)) - {"func", "_settings_parser", "method"}
    differ = {k: (getattr(spice, k), getattr(compare, k)) for k in shared if getattr(spice, k) != getattr(compare, k)}
    assert not differ, differ


def test_demo_and_label_refuse_the_same_image_size():
    from calibclust.io.images import DEFAULT_MAX_PIXELS
    from calibclust.serve import demo

    assert demo.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS


def test_settings_files_with_old_names_still_load(tmp_path, capsys):
    config = tmp_path / "old.json"
    config.write_text(json.dumps({"head_lr": 0.02, "no_joint": True}))
    assert main(["train", "spice", "f", "--out", str(tmp_path / "o"), "--clusters", "3", "--config", str(config),
                 "--print-config"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["lr_heads"] == 0.02 and printed["no_joint"] is True and "head_lr" not in printed
    assert "'head_lr'" in err and "deprecated" in err and "'lr_heads'" in err, err


def test_an_old_spelling_keeps_its_options_mutual_exclusions(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["label", "f", "--model", "m.onnx", "--out", "o", "--min-confidence", "0.5", "--coverage", "0.9"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_embed_still_reads_its_old_backbone_and_arch(capsys):
    from calibclust.embed import run

    captured = {}

    def fake_embed_folder(folder, weights, out, **kw):
        captured.update(weights=weights, arch=kw["arch"])
        raise SystemExit(0)

    import calibclust.embed as embed

    for argv in (["--backbone", "torchvision", "--arch", "resnet50"], ["--arch", "resnet50", "--backbone", "torchvision"]):
        args = _parse(["embed", str(README.parent), "--out", "f.npy", *argv])
        original, embed.embed_folder = embed.embed_folder, fake_embed_folder
        try:
            with pytest.raises(SystemExit):
                run(args)
        finally:
            embed.embed_folder = original
        assert captured == {"weights": "torchvision", "arch": "resnet50"}, argv
        err = capsys.readouterr().err
        assert "--backbone PATH is deprecated" in err and "--arch is deprecated" in err, err


def test_a_settings_file_naming_a_gpu_is_usable_with_device_cpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has the GPU the file names")
    config = tmp_path / "gpu.json"
    config.write_text(json.dumps({"device": "cuda"}))
    base = ["train", "cdc", "f", "--out", str(tmp_path / "o"), "--clusters", "3", "--config", str(config), "--print-config"]
    assert main([*base, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    with pytest.raises(SystemExit) as exc:  # without the override the file's device is checked, as if typed
        main(base)
    assert exc.value.code == 2 and "no CUDA GPU is usable" in capsys.readouterr().err
