"""K-means in torch: runs on the tensors' device, chunked distances, deterministic under a seed.

CDC runs it on the whole training set for the prototype initialisation ("Towards Calibrated Deep Clustering Network" §3.3,
Eq. 6) and on every batch for the mini-clusters of the calibration target (Eq. 1); the CDC
authors use k-means++ seeding and a PyTorch implementation for speed (appendix B, "running time").

Seeding is *greedy* k-means++ (Arthur & Vassilvitskii, 2007, with ``2 + ln k`` local trials per
centre, as scikit-learn does); Lloyd iterations stop when the squared centre shift falls below
``tol`` × the mean per-feature variance (scikit-learn's criterion). A cluster that goes empty is
re-seeded with the point farthest from its current centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (k, d)
    labels: torch.Tensor  # (n,) int64
    inertia: float  # sum of squared distances to the assigned centre
    n_iter: int


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    # A fused reduction: no (n, d) temporary (an x * x copy page-faults ~n·d·4 bytes per call).
    return torch.linalg.vector_norm(x, dim=1).square_()


def assign(
    x: torch.Tensor, centers: torch.Tensor, chunk_size: int = 16384, x_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each row of ``x``: (labels (n,), squared distances (n,)), chunked so that
    an (n, k) distance matrix never exists at once. ``x_sq`` = squared row norms, if known."""
    c_norm = _sq_norms(centers)
    if x_sq is None:
        x_sq = _sq_norms(x)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        xb = x[start : start + chunk_size]
        # ||c||² − 2 x·c in one GEMM; ||x||² is constant per row, so it is added after the min.
        d = torch.addmm(c_norm[None, :], xb, centers.T, beta=1.0, alpha=-2.0)
        best, idx = d.min(1)
        labels[start : start + chunk_size] = idx
        dists[start : start + chunk_size] = (best + x_sq[start : start + chunk_size]).clamp_min_(0)
    return labels, dists


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int = 16384, x_sq: torch.Tensor | None = None
) -> torch.Tensor:
    n = x.shape[0]
    if x_sq is None:
        x_sq = _sq_norms(x)
    n_trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centers = [x[first]]
    closest = assign(x, x[first : first + 1], chunk_size, x_sq)[1]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any point is as good as another
            candidates = torch.randint(n, (n_trials,), generator=generator, device="cpu").to(x.device)
        else:
            probs = (closest / total).double().cpu()
            candidates = torch.multinomial(probs, n_trials, replacement=True, generator=generator).to(x.device)
        # Potential after adding each candidate; keep the one that lowers it most (greedy k-means++).
        cand_d = _pairwise_sq(x, x[candidates], chunk_size, x_sq)  # (n, trials)
        new_closest = torch.minimum(closest[:, None], cand_d)
        best = new_closest.sum(0).argmin()
        centers.append(x[candidates[best]])
        closest = new_closest[:, best]
    return torch.stack(centers)


def _pairwise_sq(x: torch.Tensor, y: torch.Tensor, chunk_size: int, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    if x_sq is None:
        x_sq = _sq_norms(x)
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype, device=x.device)
    y_norm = _sq_norms(y)
    for start in range(0, x.shape[0], chunk_size):
        xb = x[start : start + chunk_size]
        block = torch.addmm(y_norm[None, :], xb, y.T, beta=1.0, alpha=-2.0)
        out[start : start + chunk_size] = block.add_(x_sq[start : start + chunk_size, None]).clamp_min_(0)
    return out


def _lloyd(x, centers, max_iter, tol_abs, chunk_size, x_sq=None):
    k, d = centers.shape
    if x_sq is None:
        x_sq = _sq_norms(x)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, dists = assign(x, centers, chunk_size, x_sq)
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        new_centers = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            # Re-seed empty clusters with the points worst served by their current centre.
            far = torch.topk(dists, min(empty.numel(), x.shape[0])).indices
            new_centers[empty[: far.numel()]] = x[far]
        shift = ((new_centers - centers) ** 2).sum()
        centers = new_centers
        if shift <= tol_abs:
            break
    labels, dists = assign(x, centers, chunk_size, x_sq)
    return centers, labels, float(dists.sum()), n_iter


def kmeans(
    x: torch.Tensor,
    k: int,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 16384,
) -> KMeansResult:
    """Cluster the rows of ``x`` (n, d) into ``k`` groups; best of ``n_init`` seeded runs by inertia."""
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        # ||x||² − 2 x·c + ||c||² cancels catastrophically in half precision (e.g. AMP features).
        x = x.float()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tol_abs = tol * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0
    x_sq = _sq_norms(x)  # once for all seedings and iterations
    best = None
    for _ in range(n_init):
        centers = kmeans_plusplus(x, k, generator, chunk_size, x_sq)
        centers, labels, inertia, n_iter = _lloyd(x, centers, max_iter, tol_abs, chunk_size, x_sq)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers, labels, inertia, n_iter)
    return best
