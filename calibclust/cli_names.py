"""One spelling per concept across calibclust's commands, and the old spellings kept for a release.

``CANONICAL`` names every option that means the same thing in more than one command, with that
meaning: a command that has the concept spells it this way. ``DEPRECATED`` lists the spellings
older releases used; :func:`add_deprecated_aliases` (called once, by ``calibclust.cli.build_parser``)
gives each in-scope parser a hidden alias that prints a warning naming the new spelling and then
acts exactly as the new option would (same type, same choices). They are removed in calibclust 0.2.
``tests/test_cli_names.py`` walks the whole argparse tree against these tables: no visible option
uses an old spelling, every option has help, every ``--help`` example parses.

:func:`device_arg` is the one ``--device`` type: a bad or unavailable device is a usage error when
the command line is read, before any image is decoded.
"""

from __future__ import annotations

import argparse
import re
import sys

REMOVED_IN = "0.2"

CANONICAL: dict[str, str] = {
    "--model": "the model a command reads (a trained model directory, or an exported .onnx / engine)",
    "--out": "where a command writes (a directory, or a file where the command writes one file)",
    "--backbone": "backbone architecture: small, resnet18/34/50, or timm:NAME",
    "--backbone-weights": "backbone weights: a pretrain run, a model directory, torchvision[:W], timm[:TAG] or a file",
    "--image-size": "side in pixels that images are resized to",
    "--batch-size": "images per batch",
    "--batch-sizes": "a list of batch sizes (profiles, timings)",
    "--max-batch-size": "the largest batch a served model accepts",
    "--lr-heads": "learning rate of the clustering / calibration heads",
    "--lr-backbone": "learning rate of the backbone",
    "--neighbors": "number of nearest neighbours",
    "--top-k": "how many of the most likely clusters to write per image",
    "--confidence-threshold": "reject (label 'uncertain') below this confidence",
    "--ood-threshold": "flag as out-of-distribution above this OOD score",
    "--checkpoint-every-steps": "optimiser steps between resume checkpoints",
    "--checkpoint-every-images": "images between resume checkpoints",
    "--overwrite": "replace what an earlier run left in the output",
    "--work-dir": "scratch directory for generated data",
    "--device": "auto, cpu, cuda or cuda:N",
    "--threads": "CPU threads for torch",
    "--seed": "random seed",
    "--max-pixels": "largest image (width × height) decoded",
    "--no-progress": "no progress bars",
}

# (old spelling, canonical spelling, commands that had the old one)
DEPRECATED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("--input-size", "--image-size", ("pretrain", "bench pretrain", "bench model", "export bench")),
    ("--topk", "--top-k", ("predict",)),
    ("--head-lr", "--lr-heads", ("train spice", "train compare")),
    ("--cdc-full", "--finetune-backbone", ("train compare",)),
    ("--checkpoint-every", "--checkpoint-every-steps", ("train spice",)),
    ("--checkpoint-every", "--checkpoint-every-images", ("label",)),
    ("--knn", "--neighbors", ("embed",)),
    ("--knn-k", "--neighbors", ("export onnx",)),
    ("--force", "--overwrite", ("export triton",)),
    ("--device", "--instance-kind", ("export triton",)),
    ("--batch", "--batch-sizes", ("export tensorrt",)),
    ("--batches", "--batch-sizes", ("bench model", "export bench")),
    ("--max-batch", "--max-batch-size", ("export triton",)),
    ("--preferred-batch", "--preferred-batch-sizes", ("export triton",)),
    ("--min-confidence", "--confidence-threshold", ("label",)),
    ("--dir", "--work-dir", ("bench label",)),
)


def warn_deprecated(command: str, old: str, new: str) -> None:
    print(f"{command}: warning: {old} is deprecated and will be removed in calibclust {REMOVED_IN}; use {new}",
          file=sys.stderr)


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling: warns, then hands the value to the canonical option's own action."""

    def __init__(self, option_strings, dest, canonical: argparse.Action, **kwargs):
        kwargs.update(nargs=canonical.nargs, type=canonical.type, choices=canonical.choices,
                      metavar=canonical.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.canonical = canonical
        self.old_dest = option_strings[0].lstrip("-").replace("-", "_")

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.canonical.option_strings[0]
        warn_deprecated(parser.prog, option_string, new)
        self.canonical(parser, namespace, values, new)


def command_of(parser: argparse.ArgumentParser) -> str:
    """``train cdc`` for the parser of ``calibclust train cdc``."""
    return parser.prog.split(" ", 1)[1] if " " in parser.prog else ""


def walk_parsers(parser: argparse.ArgumentParser):
    """Every parser of the tree, the root first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from walk_parsers(child)


def add_deprecated_aliases(root: argparse.ArgumentParser) -> None:
    """Give every parser the hidden old spellings ``DEPRECATED`` lists for its command."""
    for parser in walk_parsers(root):
        command = command_of(parser)
        for old, new, commands in DEPRECATED:
            if command not in commands or old in parser._option_string_actions:
                continue
            canonical = parser._option_string_actions.get(new)
            if canonical is None:
                raise AssertionError(f"calibclust {command} has no {new} for its deprecated {old}")
            # In the canonical option's mutually exclusive group, if any, so the old spelling cannot
            # be combined with what the new one excludes.
            group = next((g for g in parser._mutually_exclusive_groups if canonical in g._group_actions), parser)
            group.add_argument(old, dest=canonical.dest, action=DeprecatedAlias, canonical=canonical)


def deprecated_dests(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Old setting names (``head_lr``) → current ones (``lr_heads``), for settings files."""
    return {a.old_dest: a.dest for a in parser._actions if isinstance(a, DeprecatedAlias)}


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device_syntax(text: str) -> str:
    """A device name's spelling only (no torch): what a settings file is checked against, since the
    machine that reads the file may differ from the one that wrote it."""
    text = str(text).strip()
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


def device_arg(text: str) -> str:
    """argparse type of ``--device``: the syntax without torch (``auto`` imports nothing), and for an
    explicit device, whether torch can use it on this machine."""
    text = device_syntax(text)
    if text in ("auto", "cpu"):
        return text
    from calibclust.device import resolve_device
    from calibclust.errors import InputError

    try:
        resolve_device(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--device {text}: ")) from None
    return text


# Until 0.2 the model may still come first as a positional argument, as it did in export and
# exemplars; ``--model`` is the one spelling every command documents.
LEGACY_MODEL = "_legacy_model"


def add_model_arg(parser: argparse.ArgumentParser, help: str, required: bool = True, metavar: str = "MODEL") -> None:
    """``--model`` (the canonical spelling), plus the hidden positional of older releases. Add it
    before the command's other positionals: argparse fills a lone positional into the later ones."""
    parser.add_argument("--model", metavar=metavar, help=help + (" (required)" if required else ""))
    parser.add_argument(LEGACY_MODEL, nargs="?", metavar=metavar, help=argparse.SUPPRESS)
    parser.set_defaults(_model_required=required)


def resolve_legacy_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """After parsing: a positional model becomes ``args.model`` (with a warning); a required
    ``--model`` that is missing is a usage error (exit 2), as argparse's own would be."""
    legacy = getattr(args, LEGACY_MODEL, None)
    if legacy is not None:
        if args.model is not None:
            parser.error(f"unexpected argument {legacy!r} (the model is given by --model)")
        warn_deprecated(parser.prog, "the model as a positional argument", f"--model {legacy}")
        args.model = legacy
    if getattr(args, "_model_required", False) and args.model is None:
        parser.error("the following arguments are required: --model")
