"""``calibclust predict``: the predictions table from either head of a saved model."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from calibclust.io.predictions import read_predictions
from calibclust.metadata import ModelMetadata
from calibclust.models.backbones import build_backbone
from calibclust.models.clustering import ClusteringModel, save_model
from calibclust.predict import predict_folder
from calibclust.train.cli import register_cli, register_predict_cli


# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small", input_size=16, width=8), num_clusters=4, hidden_dim=16).eval()
    meta = ModelMetadata(num_clusters=4, input_size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3,
                         cluster_names=["a", "b", "c", "d"], backbone="small", embedding_dim=model.feature_dim)
    d = tmp_path_factory.mktemp("model")
    save_model(model, d, meta)
    return d, model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("x", "y"):
        (root / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(root / cls / f"{i}.png")
    (root / "y" / "broken.png").write_bytes(b"not an image")
    return root


def _reference(model, folder, paths, head):
    from calibclust.io.images import load_images

    batch, errors = load_images([folder / p for p in paths], (16, 16))
    assert not errors
    with torch.no_grad():
        return F.softmax(model.head_logits(model.embed(model.preprocess(torch.from_numpy(batch))), head), 1).numpy()


@pytest.mark.parametrize("head", ["calibration", "clustering"])
def test_predict_writes_the_table_from_either_head(model_dir, folder, tmp_path, head):
    d, model = model_dir
    out = tmp_path / f"{head}.csv"
    s = predict_folder(d, folder, out, head=head, batch_size=4, top_k=2, progress=False)
    assert s.rows == 11 and s.errors == 1 and s.head == head
    t = read_predictions(out)
    ok = t["error"] == ""
    paths = [p for p, good in zip(t["path"], ok) if good]
    assert len(paths) == 10 and all(p.startswith(("x/", "y/")) for p in paths)
    probs = np.stack([t[f"prob_{j}"][ok] for j in range(4)], 1)
    ref = _reference(model, folder, paths, head)
    assert np.allclose(probs, ref, atol=1e-6)
    assert np.array_equal(t["cluster"][ok], ref.argmax(1))
    assert np.allclose(t["confidence"][ok], ref.max(1), atol=1e-6)
    assert np.allclose(t["top1_prob"][ok], ref.max(1), atol=1e-6)
    assert list(t["cluster_name"][ok]) == [["a", "b", "c", "d"][i] for i in ref.argmax(1)]
    bad = ~ok
    assert list(t["path"][bad]) == ["y/broken.png"] and t["cluster"][bad][0] == -1 and np.isnan(t["confidence"][bad][0])


def test_heads_differ_and_default_is_the_models_predicting_head(model_dir, folder, tmp_path):
    d, model = model_dir
    predict_folder(d, folder, tmp_path / "default.jsonl", progress=False)
    predict_folder(d, folder, tmp_path / "clu.jsonl", head="clustering", progress=False)
    a, b = read_predictions(tmp_path / "default.jsonl"), read_predictions(tmp_path / "clu.jsonl")
    ok = a["error"] == ""
    assert model.predict_head == "calibration"
    assert not np.allclose(a["prob_0"][ok], b["prob_0"][ok])  # independently initialised heads


def test_predict_cli_exit_codes(model_dir, folder, tmp_path):
    d, _ = model_dir
    parser = argparse.ArgumentParser(prog="calibclust")
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    register_predict_cli(sub)
    args = parser.parse_args(["predict", str(folder), "--model", str(d), "--out", str(tmp_path / "p.csv"), "--no-progress"])
    assert args.func(args) == 3  # one unreadable image → "finished with some inputs failed"
    good = tmp_path / "good"
    (good / "x").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good / "x" / "0.png")
    args = parser.parse_args(["predict", str(good), "--model", str(d), "--out", str(tmp_path / "q.csv"), "--no-progress",
                              "--head", "clustering"])
    assert args.func(args) == 0
    from calibclust.errors import InputError

    args = parser.parse_args(["predict", str(good), "--model", str(d), "--out", str(tmp_path / "r.csv"), "--head", "nope"])
    with pytest.raises(InputError, match="no head 'nope'"):
        args.func(args)
