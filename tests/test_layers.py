"""The import direction of docs/ARCHITECTURE.md, checked on every import statement of the source
(module level and inside functions): core ← export, core ← serve, and the application layer
(``calibclust.app``, ``calibclust.cli``) above all three."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"core": REPO / "calibclust", "export": REPO / "export", "serve": REPO / "serve"}
APP = ("calibclust.app",)
# What each layer must never import (by module-name prefix).
FORBIDDEN = {
    "core": ("calibclust.export", "calibclust.serve", *APP),
    "export": ("calibclust.serve", *APP),
    "serve": ("calibclust.export", "calibclust.train", "torch", "torchvision", *APP),
}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from calibclust import serve" imports calibclust.serve
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names


def layer_files(root: Path, layer: str) -> list[Path]:
    files = sorted(root.rglob("*.py"))
    if layer == "core":
        # calibclust.app and the CLI are the application layer, above the three.
        files = [f for f in files if "app" not in f.relative_to(root).parts[:1] and f.relative_to(root) != Path("cli.py")]
    return files


def violations(layer: str, root: Path | None = None) -> list[str]:
    root = root or LAYERS[layer]
    found = {}
    for path in layer_files(root, layer):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for lineno, name in imported_names(tree):
            if layer == "core" and path.relative_to(root) == Path("__init__.py") and name.startswith(APP):
                continue  # the lazy facade: calibclust.fit / calibclust.load
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                found.setdefault((path, lineno), f"{path.relative_to(root)}:{lineno} imports {name}")
    return list(found.values())


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_point_one_way(layer):
    assert not violations(layer), "\n".join(violations(layer))


def test_the_check_sees_imports_inside_functions(tmp_path):
    (tmp_path / "bad.py").write_text("def f():\n    from calibclust.serve.labeler import Labeler\n")
    (tmp_path / "worse.py").write_text("from calibclust import app\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "ok.py").write_text("import calibclust.serve\n")  # the application layer may
    assert violations("core", tmp_path) == ["bad.py:2 imports calibclust.serve.labeler", "worse.py:1 imports calibclust.app"]
