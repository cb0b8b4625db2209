"""Resume state of a training run: one tensors file (safetensors, never pickle) plus one JSON file in
``OUT/checkpoint/``, and the optimizer (de)serialisation both need.

Atomic as a pair: each save writes a new, uniquely named tensors file, then replaces ``state.json``
(which names it) — the commit point — then deletes the previous tensors file. A run killed at any
moment leaves a JSON that names complete tensors from the same save.

Used by MoCo-v2 pretraining (``calibclust.pretrain``), CDC (``calibclust.train.cdc``) and SPICE
(``calibclust.train.spice``): a run killed at any point resumes from its last complete state with
``--resume``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from calibclust.errors import CalibclustError

STATE_JSON = "state.json"
LEGACY_TENSORS = "state.safetensors"  # CDC states written before the tensors file was named per save


def state_json(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoint" / STATE_JSON


def has_state(out_dir: str | os.PathLike) -> bool:
    return state_json(out_dir).is_file()


def write_state(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import uuid

    from safetensors.torch import save_file

    meta_path = state_json(out_dir)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    name = f"state-{uuid.uuid4().hex[:12]}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(meta_path.parent / name))
    previous = json.loads(meta_path.read_text()).get("tensors", LEGACY_TENSORS) if meta_path.is_file() else None
    tmp = meta_path.with_name(f".{STATE_JSON}.tmp")
    tmp.write_text(json.dumps({**meta, "tensors": name}, indent=1))
    os.replace(tmp, meta_path)  # the commit point
    if previous and previous != name:
        (meta_path.parent / previous).unlink(missing_ok=True)
    for stale in meta_path.parent.glob("state-*.safetensors"):  # left by a save killed before its commit
        if stale.name != name:
            stale.unlink(missing_ok=True)


def read_state_meta(out_dir: str | os.PathLike, state_format: str) -> dict | None:
    """The state's JSON (plain values; cheap, no tensors), None when the run has no state; a state
    of another kind is an error."""
    meta_path = state_json(out_dir)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != state_format:
        raise CalibclustError(f"{meta_path}: format {meta.get('format')!r}, expected {state_format!r}")
    return meta


def read_state(out_dir: str | os.PathLike, state_format: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the run's state, None when it has none; a state of another kind is an error."""
    from safetensors.torch import load_file

    meta = read_state_meta(out_dir, state_format)
    if meta is None:
        return None
    weights = state_json(out_dir).parent / meta.get("tensors", LEGACY_TENSORS)
    if not weights.is_file():
        raise CalibclustError(f"{state_json(out_dir)} names {weights.name}, which is missing: the checkpoint is incomplete")
    return load_file(str(weights), device="cpu"), meta


def optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's per-parameter state as named tensors + its param groups (plain JSON)."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{name}.{pid}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    prefix = f"opt.{name}."
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, _, field_name = key[len(prefix) :].partition(".")
            state.setdefault(int(pid), {})[field_name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
