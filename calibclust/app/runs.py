"""What the runs built on ``fit`` share (the quick start, ``bench zoo``): their settings file, which
decides whether a rerun continues or is refused, and the labelling folder they score against.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibclust.errors import InputError
from calibclust.io.files import link_or_copy, write_json_atomic

def continue_or_refuse(out: Path, settings_file: str, wanted: dict, fit_out: Path, what: str) -> bool:
    """Whether ``fit`` continues the run in ``out`` (settings in ``out/settings_file``, fit's folder
    ``fit_out``): True for an unfinished or finished run of ``what`` with the same settings, False for
    a new one. Refuses other settings, and a non-empty folder this kind of run did not start (e.g. an
    older version's layout), whose training state ``fit`` would otherwise stumble on."""
    path = out / settings_file
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out} is not empty and holds no {what} ({settings_file} is missing: an older version's "
                             "output, or another tool's); delete it or choose another --out")
        return False
    found = json.loads(path.read_text())
    if found != wanted:
        raise InputError(f"{out} holds a {what} with other settings ({found}, now {wanted}); "
                         "delete it or choose another --out")
    return (fit_out / "run.json").is_file()  # stopped before fit began: it starts afresh


def record_settings(out: Path, settings_file: str, wanted: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / settings_file, wanted)


def truth_folder(root: Path, inside: Path, ood: dict[str, Path]) -> Path:
    """``root``: links to every image of ``inside`` (class sub-folders: their ground truth) and of each
    ``ood[name]`` under ``_ood/name/`` — ``calibclust evaluate``'s convention for out-of-distribution
    images. Idempotent, so a continued run only adds what is missing."""
    from calibclust.io.images import discover_images

    for path in discover_images(inside):
        link_or_copy(path, root / path.relative_to(inside))
    for name, folder in ood.items():
        for path in discover_images(folder):
            link_or_copy(path, root / "_ood" / name / path.relative_to(folder))
    return root
