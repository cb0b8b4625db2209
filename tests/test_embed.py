"""calibclust embed: chunked memory-mapped features + file list, and top-k cosine neighbours."""

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibclust.augment import preprocess  # noqa: E402
from calibclust.datasets import make_digits_folder  # noqa: E402
from calibclust.embed import embed_folder, knn_neighbours, register_cli, sidecar_paths  # noqa: E402
from calibclust.io.images import discover_images, load_images  # noqa: E402
from calibclust.models.backbones import build_backbone  # noqa: E402
from calibclust.models.weights import load_backbone, save_backbone  # noqa: E402


# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), limit=120)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = build_backbone("small", input_size=32, width=8)
    return save_backbone(m, tmp_path_factory.mktemp("bb"), mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3))


def _cli(argv):
    parser = argparse.ArgumentParser(prog="calibclust")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_embed_writes_normalised_features_and_file_list(digits, backbone_dir, tmp_path):
    out = tmp_path / "feats.npy"
    # batch 32 over 120 images: several chunks, the last one partial
    result = embed_folder(digits, backbone_dir, out, batch_size=32, device="cpu", progress=False)
    side = sidecar_paths(out)
    feats = np.load(out, mmap_mode="r")
    paths = sorted(discover_images(digits))  # discovery order is sorted per directory
    assert feats.shape == (120, 8 * 4) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    files = side["files"].read_text().splitlines()
    assert files == [p.relative_to(digits).as_posix() for p in paths] == result.files
    # The rows are the backbone's features of those files, normalised with the saved mean/std.
    model = load_backbone(backbone_dir)
    images, errors = load_images([paths[i] for i in (0, 57, 119)], (32, 32))
    with torch.no_grad():
        z = model(preprocess(torch.from_numpy(images), (0.4, 0.4, 0.4), (0.3, 0.3, 0.3)))
    z = torch.nn.functional.normalize(z, dim=1).numpy()
    assert np.allclose(feats[[0, 57, 119]], z, atol=1e-5)
    meta = json.loads(side["meta"].read_text())
    assert meta["n_images"] == 120 and meta["feature_dim"] == 32 and meta["n_failed"] == 0


def test_unreadable_file_is_skipped_and_reported(digits, backbone_dir, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(digits, folder)
    (folder / "3" / "0000_broken.png").write_bytes(b"not an image")
    out = tmp_path / "f.npy"
    code = _cli(["embed", str(folder), "--backbone-weights", str(backbone_dir), "--out", str(out), "--batch-size", "50", "--no-progress", "--device", "cpu"])
    assert code == 3
    feats = np.load(out)
    files = sidecar_paths(out)["files"].read_text().splitlines()
    assert feats.shape == (120, 32) and len(files) == 120
    assert "3/0000_broken.png" not in files
    meta = json.loads(sidecar_paths(out)["meta"].read_text())
    assert meta["n_failed"] == 1 and meta["failed"][0]["path"].endswith("0000_broken.png")
    # Same rows as a run on the clean folder.
    clean = tmp_path / "clean.npy"
    embed_folder(digits, backbone_dir, clean, batch_size=64, device="cpu", progress=False)
    assert np.allclose(np.load(clean), feats, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))  # temporary file cleaned up


def _brute_knn(x, k):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, 1)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_knn_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx, sims = knn_neighbours(x, 5, chunk=chunk, backend="torch")
    ref_idx, ref_sims = _brute_knn(x.astype(np.float64), 5)
    assert idx.shape == (203, 5) and idx.dtype == np.int64 and sims.dtype == np.float32
    assert np.array_equal(idx, ref_idx)
    assert np.allclose(sims, ref_sims, atol=1e-5)
    assert not (idx == np.arange(203)[:, None]).any()


def test_knn_normalises_on_request_and_can_include_self():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32) * rng.uniform(0.5, 3, size=(50, 1)).astype(np.float32)
    idx, sims = knn_neighbours(x, 3, chunk=16, backend="torch", normalize=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref_idx, _ = _brute_knn(xn.astype(np.float64), 3)
    assert np.array_equal(idx, ref_idx) and sims.max() <= 1.0 + 1e-5
    with_self, s = knn_neighbours(xn, 1, chunk=16, backend="torch", exclude_self=False)
    assert np.array_equal(with_self[:, 0], np.arange(50)) and np.allclose(s[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        knn_neighbours(xn, 50, backend="torch")


def test_embed_cli_knn_on_digits_finds_same_digit_neighbours(digits, tmp_path):
    # Raw-pixel-like check of the plumbing: neighbours written beside the features, and on the
    # digits even a random small CNN puts most nearest neighbours in the same class.
    torch.manual_seed(0)
    bb = save_backbone(build_backbone("small", input_size=32, width=16), tmp_path / "bb")
    out = tmp_path / "f.npy"
    assert _cli(["embed", str(digits), "--backbone-weights", str(bb), "--out", str(out), "--neighbors", "5", "--no-progress", "--device", "cpu"]) == 0
    side = sidecar_paths(out)
    idx, sims = np.load(side["knn"]), np.load(side["knn_sims"])
    feats = np.load(out)
    assert idx.shape == (120, 5) and np.all(np.diff(sims, axis=1) <= 1e-6)
    ref_idx, _ = _brute_knn(feats.astype(np.float64), 5)
    assert np.array_equal(idx, ref_idx)
    labels = np.array([int(f.split("/")[0]) for f in side["files"].read_text().splitlines()])
    agreement = float((labels[idx] == labels[:, None]).mean())
    assert agreement > 0.3, f"5-NN label agreement {agreement:.2f} (chance 0.10)"


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[10] = x[11]  # an exact duplicate: its twin, not itself, must come first
    fi, fs = knn_neighbours(x, 6, backend="faiss")
    ti, ts = knn_neighbours(x, 6, chunk=64, backend="torch")
    assert np.allclose(fs, ts, atol=1e-5)
    # Same neighbours up to the order of (near-)ties, e.g. the two twins: the similarities of the
    # rows faiss picked equal the exact top-k similarities.
    assert np.allclose(np.take_along_axis(x @ x.T, fi, 1), ts, atol=1e-5)
    assert (fi == ti).mean() > 0.97
    assert fi[10, 0] == 11 and fi[11, 0] == 10
    assert not (fi == np.arange(300)[:, None]).any()
