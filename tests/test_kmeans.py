"""calibclust.cluster.kmeans against scikit-learn's KMeans on the same data and seeds."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sklearn.cluster import KMeans  # noqa: E402

from calibclust.bench import make_blobs  # noqa: E402
from calibclust.cluster.kmeans import _lloyd, assign, kmeans  # noqa: E402


# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _inertia(x, centers, labels):
    x = x.astype(np.float64)
    return float(((x - centers.astype(np.float64)[labels]) ** 2).sum())


def _uniform(n, d, seed):
    return np.random.default_rng(seed).random((n, d), dtype=np.float32)


@pytest.mark.parametrize(
    "data, k",
    [
        ("blobs", 10),  # separated clusters: both should find the same optimum
        ("uniform", 25),  # no cluster structure: many local optima of similar cost
        ("digits", 10),  # real data (sklearn's 8x8 digits, 64-d)
    ],
)
def test_inertia_within_one_percent_of_sklearn(data, k):
    if data == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().data.astype(np.float32)
    elif data == "blobs":
        x = make_blobs(2000, 32, 10, seed=1, noise=0.2)
    else:
        x = _uniform(1000, 16, 1)
    # Same data, same seed set, same n_init; compare the total inertia over the seed set (each run
    # is a random local optimum, so single seeds can differ either way).
    ours_total = sk_total = 0.0
    per_seed = []
    for seed in range(5):
        ours = kmeans(torch.from_numpy(x), k, n_init=3, seed=seed)
        sk = KMeans(k, n_init=3, random_state=seed).fit(x)
        ours_inertia = _inertia(x, ours.centers.numpy(), ours.labels.numpy())
        sk_inertia = _inertia(x, sk.cluster_centers_, sk.labels_)
        assert ours.inertia == pytest.approx(ours_inertia, rel=1e-4)  # reported inertia is the real one
        ours_total += ours_inertia
        sk_total += sk_inertia
        per_seed.append(round(ours_inertia / sk_inertia, 4))
    ratio = ours_total / sk_total
    assert ratio <= 1.01, f"{data}, K={k}: inertia ours/sklearn {ratio:.4f} over seeds 0-4 (per seed {per_seed})"
    assert max(per_seed) <= 1.05, f"{data}, K={k}: inertia ours/sklearn per seed {per_seed}"


def test_labels_are_nearest_centres_and_centres_are_means():
    x = torch.from_numpy(make_blobs(800, 8, 6, seed=2))
    r = kmeans(x, 6, seed=0)
    d = torch.cdist(x.double(), r.centers.double())
    assert torch.equal(r.labels, d.argmin(1))
    for c in range(6):
        members = x[r.labels == c]
        assert len(members) > 0
        assert torch.allclose(members.mean(0), r.centers[c], atol=1e-3)


def test_deterministic_under_a_seed():
    x = torch.from_numpy(_uniform(600, 10, 3))
    a, b = kmeans(x, 12, seed=5), kmeans(x, 12, seed=5)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    c = kmeans(x, 12, seed=6)
    assert not torch.equal(a.centers, c.centers)


def test_chunked_assignment_equals_one_shot():
    x = torch.from_numpy(_uniform(1000, 7, 4))
    centers = x[:13].clone()
    l1, d1 = assign(x, centers, chunk_size=97)
    l2, d2 = assign(x, centers, chunk_size=10**6)
    assert torch.equal(l1, l2) and torch.allclose(d1, d2)
    full = kmeans(x, 9, seed=0, chunk_size=10**6)
    chunked = kmeans(x, 9, seed=0, chunk_size=64)
    assert torch.allclose(full.centers, chunked.centers, atol=1e-5)


def test_empty_cluster_is_reseeded():
    # Two tight groups and three starting centres, one far from every point: it gets no points
    # in the first assignment and must be re-seeded onto the data, ending non-empty.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 2, generator=g) * 0.1, torch.randn(100, 2, generator=g) * 0.1 + 5.0])
    x = torch.cat([x, torch.tensor([[2.5, 2.5]])])  # an in-between point worth its own cluster
    start = torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])
    centers, labels, inertia, _ = _lloyd(x, start, max_iter=20, tol_abs=0.0, chunk_size=64)
    counts = torch.bincount(labels, minlength=3)
    assert (counts > 0).all(), counts
    assert centers[2].norm() < 10, centers  # moved onto the data
    assert inertia < _inertia(x.numpy(), start.numpy(), assign(x, start)[0].numpy())


def test_fewer_distinct_points_than_clusters():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]).repeat(10, 1)
    r = kmeans(x, 5, seed=0)
    assert r.labels.min() >= 0 and r.labels.max() < 5
    assert r.inertia == pytest.approx(0.0, abs=1e-6)


def test_input_validation():
    with pytest.raises(ValueError):
        kmeans(torch.zeros(10), 2)
    with pytest.raises(ValueError):
        kmeans(torch.zeros(5, 2), 6)


@pytest.mark.gpu
def test_cuda_matches_cpu_inertia():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.from_numpy(make_blobs(5000, 64, 50, seed=0))
    cpu = kmeans(x, 50, seed=0)
    gpu = kmeans(x.cuda(), 50, seed=0)
    assert gpu.centers.is_cuda and gpu.labels.is_cuda
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)


def test_half_precision_input_is_clustered_in_float32():
    x = make_blobs(600, 16, 5, seed=3, noise=0.2)
    full = kmeans(torch.from_numpy(x), 5, seed=0)
    half = kmeans(torch.from_numpy(x).to(torch.bfloat16), 5, seed=0)
    assert half.centers.dtype == torch.float32
    assert half.inertia == pytest.approx(full.inertia, rel=0.02)
