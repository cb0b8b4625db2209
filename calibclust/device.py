"""Which torch device a command runs on: the one resolution of ``--device`` every trainer uses."""

from __future__ import annotations

import os


def resolve_device(name: str = "auto"):
    """``auto`` → this process's GPU if torch sees one, else the CPU. A bare ``cuda`` gets an index
    too (the process's LOCAL_RANK under torchrun, else 0): ``torch.cuda.set_device`` and DDP's
    ``device_ids`` refuse an index-less CUDA device. An unusable name is an InputError, not a
    torch traceback."""
    import torch

    from calibclust.errors import InputError

    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is usable on this machine (torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: torch.backends.mps.is_available() is False on this machine")
    return device
