"""Resume state of a training run: one tensors file (safetensors, never pickle) plus one JSON file in
``OUT/checkpoint/``, replaced atomically as a pair, and the optimizer (de)serialisation both need.

Used by CDC (``calibclust.train.cdc``) and SPICE (``calibclust.train.spice``): a run killed at any
point resumes from its last complete state with ``--resume``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from calibclust.errors import CalibclustError, InputError

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


def state_paths(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(out_dir) / "checkpoint"
    return d / STATE_TENSORS, d / STATE_JSON


def write_state(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write both files under temporary names, then rename them into place (tensors first: a state
    JSON is only ever next to tensors at least as new as itself)."""
    from safetensors.torch import save_file

    weights, meta_path = state_paths(out_dir)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_m = weights.with_name(f".{STATE_TENSORS}.tmp"), meta_path.with_name(f".{STATE_JSON}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_w))
    tmp_m.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta_path)


def read_state(out_dir: str | os.PathLike, state_format: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the run's state, None when it has none; a state of another kind is an error."""
    from safetensors.torch import load_file

    weights, meta_path = state_paths(out_dir)
    if not weights.is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != state_format:
        raise CalibclustError(f"{meta_path}: format {meta.get('format')!r}, expected {state_format!r}")
    return load_file(str(weights), device="cpu"), meta


def check_same_settings(saved: dict, current: dict, out_dir, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a resume whose settings differ from the checkpoint's (naming every difference)."""
    diff = sorted(k for k in current if k not in ignore and saved.get(k) != current[k])
    if diff:
        raise InputError(
            f"--resume with different settings than the checkpoint in {out_dir}: "
            + ", ".join(f"{k} ({saved.get(k)!r} → {current[k]!r})" for k in diff)
        )


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
