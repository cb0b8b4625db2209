"""Exemplars sidecar: selection, streaming selection, file round trip and refusals, new model files,
and the ``calibclust exemplars`` command."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import colour_image, make_contract_model, write_good_images  # noqa: E402

from calibclust.cli import main as cli_main  # noqa: E402
from calibclust.contract import read_model_metadata  # noqa: E402
from calibclust.errors import InputError  # noqa: E402
from calibclust.exemplars import (  # noqa: E402
    FORMAT,
    Exemplars,
    ExemplarsError,
    TopPerCluster,
    attach_exemplars,
    build_exemplars,
    load_model_exemplars,
    new_model_path,
    read_exemplars,
    save_model_copy,
    select_exemplars,
    thumbnail_size_for,
    write_exemplars,
)
from calibclust.io.images import decode_image  # noqa: E402
from calibclust.serve.labeler import Labeler  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("ex_model") / "model.onnx")


def random_exemplars(n=10, k=3, size=(8, 6), seed=0) -> Exemplars:
    rng = np.random.default_rng(seed)
    return Exemplars(
        images=rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
        cluster=rng.integers(0, k, n),
        score=rng.random(n),
        paths=[f"dossier/é{i}.png" for i in range(n)],  # non-ASCII survives the round trip
        num_clusters=k,
        info={"source_folder": "/data"},
    )


# --------------------------------------------------------------------------- selection
def test_select_exemplars_hand_made():
    cluster = np.array([0, 0, 0, 1, 1, -1, 2, 0, 1])
    score = np.array([0.5, 0.9, 0.7, 0.8, np.nan, 0.99, 0.3, 0.9, 0.8])
    eligible = np.array([True, True, True, True, True, True, True, True, False])
    chosen = select_exemplars(cluster, score, 4, per_cluster=2, eligible=eligible)
    # cluster 0: 0.9 (row 1) and 0.9 (row 7) tie -> row order; 0.7 and 0.5 dropped
    assert [c.tolist() for c in chosen] == [[1, 7], [3], [6], []]
    # the unreadable row (-1) and the NaN score are never chosen, whatever their score
    all_rows = select_exemplars(cluster, score, 4, per_cluster=10)
    assert [c.tolist() for c in all_rows] == [[1, 7, 2, 0], [3, 8], [6], []]


def test_streaming_selection_equals_batch_selection():
    rng = np.random.default_rng(1)
    n, k = 1000, 7
    cluster = rng.integers(-1, k, n)
    score = np.round(rng.random(n), 2)  # many ties
    eligible = rng.random(n) > 0.2
    paths = [f"p{i}" for i in range(n)]
    top = TopPerCluster(k, per_cluster=5)
    for start in range(0, n, 64):
        sl = slice(start, start + 64)
        top.add(paths[sl], cluster[sl], score[sl], eligible[sl])
    got_paths, got_cluster, got_score = top.result()
    expected = np.concatenate(select_exemplars(cluster, score, k, per_cluster=5, eligible=eligible))
    assert got_paths == [paths[i] for i in expected]
    np.testing.assert_array_equal(got_cluster, cluster[expected])
    np.testing.assert_array_equal(got_score, score[expected])


def test_thumbnail_size_keeps_aspect_and_caps():
    assert thumbnail_size_for((32, 32)) == (32, 32)
    assert thumbnail_size_for((224, 224)) == (96, 96)
    assert thumbnail_size_for((200, 100), max_side=50) == (50, 25)


# --------------------------------------------------------------------------- sidecar file
def test_round_trip(tmp_path):
    ex = random_exemplars()
    path = write_exemplars(tmp_path / "m.exemplars.npz", ex)
    back = read_exemplars(path)
    assert back.num_clusters == 3 and back.score_name == "confidence" and back.info == {"source_folder": "/data"}
    assert back.thumbnail_size == (8, 6)
    # stored by cluster, most typical first; every (image, score, path) triple intact
    assert np.all(np.diff(back.cluster) >= 0)
    for c in range(3):
        imgs, scores, paths = back.for_cluster(c)
        assert np.all(np.diff(scores) <= 0)
        for img, s, p in zip(imgs, scores, paths):
            i = ex.paths.index(p)
            np.testing.assert_array_equal(img, ex.images[i])
            assert s == ex.score[i] and ex.cluster[i] == c
    np.testing.assert_array_equal(back.counts(), np.bincount(ex.cluster, minlength=3))
    assert not list(tmp_path.glob(".*partial*")), "temporary file left behind"


def test_refuses_bad_sidecars(tmp_path):
    with pytest.raises(ExemplarsError, match="not found"):
        read_exemplars(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ExemplarsError, match="unreadable"):
        read_exemplars(tmp_path / "text.npz")
    ex = random_exemplars()
    base = dict(images=ex.images, cluster=ex.cluster, score=ex.score, paths=np.array(ex.paths))
    np.savez(tmp_path / "other.npz", **base, info=np.array('{"format": "something/9", "num_clusters": 3}'))
    with pytest.raises(ExemplarsError, match="something/9"):
        read_exemplars(tmp_path / "other.npz")
    np.savez(tmp_path / "missing.npz", images=ex.images, info=np.array(f'{{"format": "{FORMAT}"}}'))
    with pytest.raises(ExemplarsError, match="missing cluster, score, paths"):
        read_exemplars(tmp_path / "missing.npz")
    # paths as a pickled object array: refused, never unpickled
    np.savez(tmp_path / "pickled.npz", **{**base, "paths": np.array(ex.paths, dtype=object)},
             info=np.array(f'{{"format": "{FORMAT}", "num_clusters": 3}}'))
    with pytest.raises(ExemplarsError, match="unreadable"):
        read_exemplars(tmp_path / "pickled.npz")
    np.savez(tmp_path / "badid.npz", **{**base, "cluster": ex.cluster + 5},
             info=np.array(f'{{"format": "{FORMAT}", "num_clusters": 3}}'))
    with pytest.raises(ExemplarsError, match=r"cluster ids must be in \[0, 3\)"):
        read_exemplars(tmp_path / "badid.npz")
    with pytest.raises(ExemplarsError, match="uint8"):
        Exemplars(ex.images.astype(np.float32), ex.cluster, ex.score, ex.paths, 3)


# --------------------------------------------------------------------------- building
def test_build_decodes_thumbnails_and_replaces_unreadable_choices(tmp_path):
    paths = write_good_images(tmp_path / "imgs", 6, size=20)
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    paths = [*paths, bad]
    cluster = np.array([0, 0, 1, 1, 0, 2, 0])
    score = np.array([0.2, 0.6, 0.9, 0.8, 0.4, 0.5, 0.95])  # the broken file is cluster 0's best
    ex, errors = build_exemplars(paths, cluster, score, 3, (10, 10), per_cluster=2,
                                 display_paths=[Path(p).name for p in paths])
    assert len(errors) == 1 and errors[0].path.endswith("broken.png")
    assert ex.thumbnail_size == (10, 10)
    imgs0, scores0, names0 = ex.for_cluster(0)
    assert names0 == ["img_00001.png", "img_00004.png"] and list(scores0) == [0.6, 0.4]  # next candidates
    np.testing.assert_array_equal(imgs0[0], decode_image(paths[1], size=(10, 10)))
    assert ex.for_cluster(1)[2] == ["img_00002.png", "img_00003.png"]
    assert ex.for_cluster(2)[2] == ["img_00005.png"]
    with pytest.raises(InputError, match="lengths differ"):
        build_exemplars(paths[:2], cluster, score, 3, (10, 10))


# --------------------------------------------------------------------------- new model files
def test_attach_writes_a_new_model_and_never_touches_the_original(model, tmp_path):
    before = sha256(model)
    ex = random_exemplars(k=3)
    out = tmp_path / "copy" / "with_ex.onnx"
    new_model, sidecar = attach_exemplars(model, ex, out)
    assert new_model == out and sidecar == out.parent / "with_ex.exemplars.npz"
    assert sha256(model) == before
    meta = read_model_metadata(new_model)
    assert meta.exemplars == "with_ex.exemplars.npz"
    assert meta.to_dict() | {"exemplars": None} == read_model_metadata(model).to_dict()
    loaded, note = load_model_exemplars(new_model, meta)
    assert note == "" and np.array_equal(loaded.counts(), ex.counts())
    # both files exist now: a second attach to the same name is refused, nothing replaced
    with pytest.raises(InputError, match="already exists"):
        attach_exemplars(model, ex, out)
    with pytest.raises(InputError, match="clusters"):
        attach_exemplars(model, random_exemplars(k=4), tmp_path / "k4.onnx")
    assert not (tmp_path / "k4.exemplars.npz").exists()
    # the default name is beside the original, numbered when taken
    assert new_model_path(model, "exemplars") == model.parent / "model-exemplars.onnx"


def test_copy_to_another_folder_carries_the_sidecar(model, tmp_path):
    new_model, sidecar = attach_exemplars(model, random_exemplars(), tmp_path / "a" / "m.onnx")
    meta = read_model_metadata(new_model).replace(cluster_names=["x", "y", "z"])
    moved = save_model_copy(new_model, tmp_path / "b" / "named.onnx", meta)
    assert (tmp_path / "b" / sidecar.name).read_bytes() == sidecar.read_bytes()
    assert load_model_exemplars(moved, read_model_metadata(moved))[0] is not None
    assert Labeler(moved).cluster_names == ["x", "y", "z"]
    with pytest.raises(InputError, match="already exists"):
        save_model_copy(new_model, moved, meta)
    with pytest.raises(InputError, match="already exists"):
        save_model_copy(new_model, new_model, meta)
    with pytest.raises(InputError, match=r"\.onnx"):
        save_model_copy(new_model, tmp_path / "named.txt", meta)


def test_missing_or_mismatched_sidecar_gives_a_note(model, tmp_path):
    meta = read_model_metadata(model)
    ex, note = load_model_exemplars(model, meta)
    assert ex is None and "calibclust exemplars" in note
    new_model, sidecar = attach_exemplars(model, random_exemplars(), tmp_path / "m.onnx")
    write_exemplars(sidecar, random_exemplars(k=5))  # replaced behind the model's back
    ex, note = load_model_exemplars(new_model, read_model_metadata(new_model))
    assert ex is None and "5 clusters" in note
    sidecar.unlink()
    ex, note = load_model_exemplars(new_model, read_model_metadata(new_model))
    assert ex is None and "not found" in note


# --------------------------------------------------------------------------- the command
def test_exemplars_command(model, tmp_path, capsys):
    folder = tmp_path / "train"
    write_good_images(folder, 30, seed=2, subdirs=2)
    for name, rgb in [("pure_red.png", (1, 0, 0)), ("pure_blue.png", (0, 0, 1)), ("grey.png", (0.5, 0.5, 0.5))]:
        Image.fromarray(colour_image(rgb)).save(folder / name)
    (folder / "broken.jpg").write_text("no")
    before = sha256(model)
    out = tmp_path / "with_ex.onnx"
    rc = cli_main(["exemplars", str(folder), "--model", str(model), "--out", str(out), "--per-cluster", "3", "--no-progress"])
    assert rc == 3, "one unreadable file: finished with exit code 3"
    assert sha256(model) == before
    meta = read_model_metadata(out)
    ex = read_exemplars(out.parent / meta.exemplars)
    assert ex.thumbnail_size == (16, 16) and ex.score_name == "confidence"
    # independent check: the Labeler's most confident non-OOD images per cluster
    files = sorted(p for p in folder.rglob("*.png"))
    table, _ = Labeler(model).label(files)
    conf, clus, ood = (np.array(table[k]) for k in ("confidence", "cluster", "ood_score"))
    for c in range(3):
        ok = (clus == c) & (ood <= meta.ood.threshold)
        expected = sorted(conf[ok], reverse=True)[:3]
        _, scores, paths = ex.for_cluster(c)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
        assert all(not Path(p).is_absolute() for p in paths)  # recorded relative to FOLDER
    assert "grey.png" not in ex.paths, "an OOD image (uniform probabilities) was chosen as an exemplar"
    assert ex.for_cluster(0)[2][0] == "pure_red.png" and ex.for_cluster(2)[2][0] == "pure_blue.png"
    text = capsys.readouterr().out
    assert "calibclust demo --model" in text and str(out) in text


def test_exemplars_command_help_and_usage_errors(model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "calibclust", "exemplars", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "never modified" in result.stdout and "examples:" in result.stdout
    assert cli_main(["exemplars", str(tmp_path / "nope"), "--model", str(model)]) == 2
    (tmp_path / "empty").mkdir()
    assert cli_main(["exemplars", str(tmp_path / "empty"), "--model", str(model), "--no-progress"]) == 2
    assert not list(model.parent.glob("*-exemplars*.onnx"))
