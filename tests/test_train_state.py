"""The shared resume state (calibclust/train/state.py): the tensors file and state.json commit as a pair."""

import json

import pytest
import torch

from calibclust.errors import CalibclustError
from calibclust.train.state import has_state, read_state, state_json, write_state

FMT = "test-state/1"


def test_each_save_commits_a_pair_and_removes_the_previous_tensors(tmp_path):
    assert not has_state(tmp_path) and read_state(tmp_path, FMT) is None
    write_state(tmp_path, {"w": torch.zeros(3)}, {"format": FMT, "step": 1})
    first = json.loads(state_json(tmp_path).read_text())["tensors"]
    write_state(tmp_path, {"w": torch.ones(3)}, {"format": FMT, "step": 2})
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    meta = json.loads(state_json(tmp_path).read_text())
    assert files == sorted([meta["tensors"], "state.json"]) and meta["tensors"] != first, files
    tensors, meta = read_state(tmp_path, FMT)
    assert meta["step"] == 2 and torch.equal(tensors["w"], torch.ones(3))


def test_a_save_killed_before_its_commit_leaves_the_previous_state(tmp_path):
    write_state(tmp_path, {"w": torch.zeros(3)}, {"format": FMT, "step": 1})
    # what a kill between writing the new tensors and replacing state.json leaves behind
    from safetensors.torch import save_file

    save_file({"w": torch.full((3,), 7.0)}, str(tmp_path / "checkpoint" / "state-killedsave0.safetensors"))
    tensors, meta = read_state(tmp_path, FMT)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.zeros(3))
    write_state(tmp_path, {"w": torch.ones(3)}, {"format": FMT, "step": 2})  # the next save sweeps it
    assert not (tmp_path / "checkpoint" / "state-killedsave0.safetensors").exists()


def test_legacy_pair_is_read_and_wrong_or_incomplete_states_are_refused(tmp_path):
    from safetensors.torch import save_file

    ck = tmp_path / "checkpoint"
    ck.mkdir()
    save_file({"w": torch.ones(2)}, str(ck / "state.safetensors"))  # CDC states before per-save names
    (ck / "state.json").write_text(json.dumps({"format": FMT, "epoch": 3}))
    tensors, meta = read_state(tmp_path, FMT)
    assert meta["epoch"] == 3 and torch.equal(tensors["w"], torch.ones(2))
    with pytest.raises(CalibclustError, match="expected 'other/1'"):
        read_state(tmp_path, "other/1")
    (ck / "state.safetensors").unlink()
    with pytest.raises(CalibclustError, match="missing"):
        read_state(tmp_path, FMT)
