"""Backbone names, without torch: what argparse and the CLI validate before anything heavy loads.

* :data:`BACKBONES` – the built-in architectures (:mod:`calibclust.models.backbones`);
* ``timm:NAME`` – any model of the timm library (``pip install 'calibclust[timm]'``), e.g.
  ``timm:resnet18`` or ``timm:vit_small_patch16_224``; whether NAME exists is checked when the
  backbone is built, since asking timm would import torch.

This module must stay importable without torch and timm (the CLI registers its subcommands
through it; tests/test_timm_backbone.py checks).
"""

from __future__ import annotations

import argparse
import re

BACKBONES = ("small", "resnet18", "resnet34", "resnet50")
TIMM_PREFIX = "timm:"
# timm model names (and their optional ".pretrained_tag") use only these characters.
_TIMM_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

BACKBONE_HELP = (
    f"choose {', '.join(BACKBONES)}, or {TIMM_PREFIX}NAME for any timm model, e.g. {TIMM_PREFIX}resnet18 "
    f"or {TIMM_PREFIX}vit_small_patch16_224; {TIMM_PREFIX}NAME needs pip install 'calibclust[timm]'"
)

# What the backbone is given (:func:`calibclust.models.backbones.with_input_filter`).
INPUT_FILTERS = ("none", "gradient")
# fit's choices: "auto" pretrains on the images and again on their gradients when the clusters
# follow colour, brightness or contrast (calibclust.app.fitting).
FIT_INPUT_FILTERS = ("auto", *INPUT_FILTERS)
INPUT_FILTER_HELP = (
    "what the backbone sees (default %(default)s): none = the image; gradient = the magnitude of its "
    "Sobel gradients (edges, blind to colours and to dark-on-light vs light-on-dark), for folders "
    "whose colours vary independently of the classes"
)


def is_timm(name: str) -> bool:
    """Whether ``name`` asks for a timm model (``timm:NAME``)."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def timm_model_name(name: str) -> str:
    """``NAME`` of ``timm:NAME``."""
    if not is_timm(name):
        raise ValueError(f"{name!r} is not a timm backbone name ({TIMM_PREFIX}NAME)")
    return name[len(TIMM_PREFIX) :]


def backbone_name(text: str) -> str:
    """argparse ``type=`` for ``--backbone``: one of :data:`BACKBONES` or ``timm:NAME``."""
    if text in BACKBONES:
        return text
    if is_timm(text) and _TIMM_NAME.fullmatch(timm_model_name(text)):
        return text
    if is_timm(text):
        problem = f"{text!r}: the timm model name after {TIMM_PREFIX!r} is empty" if text == TIMM_PREFIX else (
            f"{text!r}: a timm model name has only letters, digits, '_', '.' and '-'"
        )
    elif text.lower() in BACKBONES:
        problem = f"{text!r}: backbone names are lower case"
    else:
        problem = f"unknown backbone {text!r}"
    raise argparse.ArgumentTypeError(f"{problem}; {BACKBONE_HELP}")
