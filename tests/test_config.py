"""The one config base (calibclust.config): strict from_dict / to_dict with nested configs, every
problem in one error, the fields --resume may change; and each CLI default equal to its config's."""

from __future__ import annotations

import json

import pytest

from calibclust.config import ConfigError
from calibclust.errors import InputError


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
    """Each default lives in the config: with no options, `train cdc`, `train spice` and `pretrain`
    build exactly the config's defaults, except the differences listed (and said in --help)."""
    from calibclust.cli import build_parser
    from calibclust.pretrain import MoCoConfig, config_from_args
    from calibclust.train.cdc import CDCConfig
    from calibclust.train.cli import _config_from_args
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

    moco = config_from_args(parser.parse_args(["pretrain", "f", "--out", "o"]))
    assert moco == MoCoConfig()
