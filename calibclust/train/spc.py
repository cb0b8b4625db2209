"""SPC ("Selective Pseudo-Label Clustering", Mahon & Lukasiewicz) on frozen backbone features.

The paper's method (§3, Fig. 1, Algorithm 1), and where each piece lives here:

1. **K autoencoders** (f_j, g_j), pretrained on ℓ1 reconstruction (Alg. 1 lines 1–3, §3.2) —
   :class:`SPCEnsemble` (the K members' weights stacked, see below), :func:`run_epochs` with no
   point agreed.
2. **Cluster in each latent space** (ψ of Eq. 1) — :func:`cluster_latent`: a Gaussian mixture
   (scikit-learn's ``GaussianMixture``), the paper's SPC-GMM (§3.2, Table 1).
3. **Consensus Γ** (Eq. 1): align every labelling to one member by the Hungarian algorithm
   (:func:`calibclust.train.selection_spice.align_labels`, the "direct" method of §3.2),
   c_i = the most common aligned label, a_i = 1 iff all K aligned labels agree — :func:`consensus`.
4. **Train on the selected pseudo-labels** (Eq. 2): cross-entropy of the pseudo-classifier h_j∘f_j
   on the agreed points, ℓ1 reconstruction ‖g_j(f_j(x_i)) − x_i‖₁ on the others, with Gaussian
   noise in the latent space (§3.2) — :func:`spc_loss`, :func:`run_epochs`. Back to 2 **while the
   number of agreed points increases** (Alg. 1's while loop) — :func:`agreement_loop`; the points
   then take their consensus label c_i (§3). :func:`train_spc` runs the whole of Algorithm 1.

Where this differs from the paper, and why:

* **Inputs are frozen backbone features, not pixels.** calibclust clusters with a pretrained
  backbone (MoCo-v2 or ImageNet weights), and a method never changes the backbone it is given
  (:mod:`calibclust.train.methods`). So each member is a small MLP autoencoder on the
  L2-normalised features, embedded once: f_j = Linear → BatchNorm → LeakyReLU → Linear (latent),
  g_j = Linear → LeakyReLU → Linear → tanh, h_j = Linear(25) → LeakyReLU → Linear — the paper's
  conv / batch-norm encoders and transpose-conv decoders with leaky ReLU, a tanh output and a
  25-unit pseudo-classifier (§3.2), as dense layers. The tanh fits: every entry of an
  L2-normalised feature lies in [−1, 1], as the paper's pixels do. The K members are K separate
  networks (own initialisation, own shuffles, own noise); their weights are stacked only so one
  batched matmul trains all of them, which on a CPU beats 15 small networks stepped in turn.
* **No UMAP before the GMM.** The paper's ψ is UMAP followed by HDBSCAN or a GMM (§3.2). UMAP and
  HDBSCAN are no dependency of calibclust; ψ here is the GMM alone on the 20-d latent space, whose
  inputs already come from a pretrained backbone rather than raw pixels. The GMM keeps the best of
  ``gmm_restarts`` fits (scikit-learn's default is one) and each member keeps its GMM seed from
  round to round: without UMAP's well-separated clusters a single fit often merges two clusters, and
  one such member empties the agreed set of both (measured in :class:`SPCConfig`).
* **When the loop ends.** Alg. 1 stops at the first round whose agreed set does not grow. On
  features the count is noisy, and a stall often comes before the big growth, so growth must exceed
  ``min_growth``·N points and the loop allows ``patience`` rounds without it (``patience=0,
  min_growth=0`` is the paper's rule). The consensus kept is the one with the most agreed points.
* **A model that labels new images.** The paper labels its training set only (consensus c_i). A
  calibclust model must label any image through one head on backbone features (the model
  contract), so after the loop an MLP head (:class:`calibclust.models.clustering.MLPHead`) is
  trained on the backbone features towards the ensemble's aligned votes (``head_targets="votes"``:
  soft targets = the fraction of members giving each cluster, whose argmax is c_i; or
  ``"consensus"``: one-hot c_i). Its confidence thus follows the ensemble's agreement, SPC's own
  notion of a confident point (§3, §4.1) — still not calibrated (``calibrated=False``).
* **Epochs, learning rate, batch size and the noise's scale are not in the paper**; ``SPCConfig``
  documents ours and what they were measured against.

Time on 2 CPU cores shared with other jobs, the sklearn digits and a 128-d pretrained small backbone,
default settings (15 members): 141 s for ``train compare``'s 1,442 training images (11 rounds,
the feature pass included), 174-198 s for all 1,797 (13-16 rounds); ``max_rounds`` = 20 bounds a
run at about 4 minutes there. Each round costs about 10 s (30 epochs of the 15 members, 15 GMMs).

Measured with ``calibclust train compare`` on those digits (355 held-out images; the quick start's
200-epoch MoCo-v2 backbone): seed 0, ACC 0.814 / ECE 0.123 (K-means 0.735 / 0.619), the loop
stalling at about 1,000 of 1,442 agreed points and ending after 11 rounds; seed 2, ACC 0.944 / ECE
0.048 (K-means 0.775 / 0.659), the agreed set growing from 720 to 1,348 in 20 rounds. Whether and
when the growth of the paper's Fig. 2 starts varies with the seed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust.config import Config
from calibclust.train.methods import ClusteringMethod
from calibclust.train.selection_spice import align_labels

HEAD_TARGETS = ("votes", "consensus")
GMM_COVARIANCES = ("full", "tied", "diag", "spherical")


@dataclass
class SPCConfig(Config):
    """SPC's settings ("Selective Pseudo-Label Clustering" §3.2, §5.2); what the paper leaves open is marked ours."""

    TITLE: ClassVar[str] = "SPC configuration"

    num_clusters: int = 10  # C: set to the ground truth, as in the paper (§3.2)
    members: int = 15  # K, the ensemble size: 15 gives Table 1's results (Table 3)
    latent_dim: int = 20  # m: 50 for MNIST, 20 for the smaller USPS (§3.2); our sets are small too
    hidden_dim: int = 128  # width of f_j's and g_j's hidden layer (ours: the paper's are conv stacks)
    classifier_hidden: int = 25  # h_j's one hidden layer (§3.2)
    latent_noise: float = 0.1  # std of the Gaussian noise added to the latent in training (§3.2; value ours)
    # GMM fits per clustering, best by likelihood (scikit-learn's n_init, 1 by default): one fit often
    # merges two clusters, and one such member of 15 removes both from the agreed set (digits: 632
    # agreed points before the first round with 1 fit, 1176 with 5).
    gmm_restarts: int = 5
    gmm_covariance: str = "full"  # ψ: scikit-learn's GaussianMixture default (§3.2 "all default parameters")
    pretrain_epochs: int = 50  # Alg. 1 lines 1-3: autoencoder epochs before the loop (ours)
    # Epochs minimising Eq. 2 per round (ours): after 5 (batches of 256) the pseudo-classifiers have
    # barely learnt the agreed labels (h_j∘f_j at ACC 0.4 on the digits) and the agreed set does not
    # grow; after 30 (batches of 128) they are at 0.73 and it grows.
    round_epochs: int = 30
    # Cap on Alg. 1's while loop, which ends earlier when the agreed set stops growing. A slow creep
    # (+15 agreed points in 6 rounds) can keep a run going for 30 rounds (5 minutes on a busy 2-core
    # machine); in the two of our digits runs that went past round 20, round 20's consensus ACC was
    # within 0.005 of the end's.
    max_rounds: int = 20
    # When the loop ends (Alg. 1: as soon as the agreed set does not grow). On features the count is
    # noisy by about ±1 % from round to round, and a stall of up to 5 rounds can precede the big
    # growth (measured on the 1,797 digits, seed 1: 1115, 1203, 1213, 1157, 1226, 1219, 1225, 1360,
    # 1450, 1594, ... 1728 agreed, consensus ACC 0.79 → 0.94), so growth means more than
    # min_growth·N new agreed points, and the loop ends after patience + 1 computations without it.
    patience: int = 5
    min_growth: float = 0.01
    batch_size: int = 128
    lr: float = 1e-3  # Adam, for the members and the final head (ours)
    head_hidden_dim: int = 512  # the model's MLP head (D → H → BN → ReLU → C), trained after the loop
    head_epochs: int = 60
    head_targets: str = "votes"  # "votes": the members' aligned vote shares; "consensus": one-hot c_i
    seed: int = 0

    def problems(self) -> list[str]:
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.members < 2:
            problems.append(f"members must be >= 2 (agreement needs an ensemble), got {self.members}")
        for name in ("gmm_restarts", "latent_dim", "hidden_dim", "classifier_hidden", "batch_size", "head_hidden_dim",
                     "max_rounds"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_epochs", "round_epochs", "head_epochs", "patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_growth < 1:
            problems.append(f"min_growth must be in [0, 1), got {self.min_growth}")
        if not self.latent_noise >= 0:
            problems.append(f"latent_noise must be >= 0, got {self.latent_noise}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.gmm_covariance not in GMM_COVARIANCES:
            problems.append(f"gmm_covariance must be one of {', '.join(GMM_COVARIANCES)}, got {self.gmm_covariance!r}")
        if self.head_targets not in HEAD_TARGETS:
            problems.append(f"head_targets must be one of {', '.join(HEAD_TARGETS)}, got {self.head_targets!r}")
        return problems


# --- the ensemble: f_j, g_j, h_j of every member -----------------------------------------------------
class _Linear(nn.Module):
    """K independent ``nn.Linear`` layers (same default initialisation), applied at once by a batched matmul."""

    def __init__(self, k: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default: U(-1/√in, 1/√in) for weight and bias
        self.weight = nn.Parameter(torch.empty(k, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(k, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, B, in) -> (K, B, out)
        return torch.baddbmm(self.bias, x, self.weight)


class _BatchNorm(nn.Module):
    """K independent ``nn.BatchNorm1d`` layers: each member normalises over its own batch."""

    def __init__(self, k: int, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(k, 1, dim))
        self.bias = nn.Parameter(torch.zeros(k, 1, dim))
        self.register_buffer("running_mean", torch.zeros(k, 1, dim))
        self.register_buffer("running_var", torch.ones(k, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, B, dim)
        if self.training:
            mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
            with torch.no_grad():  # running statistics as nn.BatchNorm1d keeps them (unbiased variance)
                b = x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * b / max(b - 1, 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SPCEnsemble(nn.Module):
    """The K members' encoders f_j, decoders g_j and pseudo-classifiers h_j (§3.1, §3.2) as MLPs on
    features, their weights stacked so one batched matmul runs every member; the members share no
    parameter, batch or noise draw, so this trains exactly as K separate networks would.

    f_j: D → hidden → BN → LeakyReLU → m;  g_j: m → hidden → LeakyReLU → D → tanh;
    h_j: m → 25 → LeakyReLU → C."""

    def __init__(self, members: int, in_dim: int, hidden_dim: int, latent_dim: int, num_clusters: int,
                 classifier_hidden: int):
        super().__init__()
        k = members
        self.members, self.latent_dim = k, latent_dim
        self.enc1, self.enc_bn = _Linear(k, in_dim, hidden_dim), _BatchNorm(k, hidden_dim)
        self.enc2 = _Linear(k, hidden_dim, latent_dim)
        self.dec1, self.dec2 = _Linear(k, latent_dim, hidden_dim), _Linear(k, hidden_dim, in_dim)
        self.cls1, self.cls2 = _Linear(k, latent_dim, classifier_hidden), _Linear(k, classifier_hidden, num_clusters)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # f_j: (K, B, D) -> (K, B, m)
        return self.enc2(F.leaky_relu(self.enc_bn(self.enc1(x)), 0.2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # g_j: (K, B, m) -> (K, B, D)
        return torch.tanh(self.dec2(F.leaky_relu(self.dec1(z), 0.2)))

    def classify(self, z: torch.Tensor) -> torch.Tensor:  # h_j: (K, B, m) -> (K, B, C) logits
        return self.cls2(F.leaky_relu(self.cls1(z), 0.2))

    @torch.no_grad()
    def latents(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Eval-mode f_j(x) of every member, no noise: what ψ clusters. (N, D) -> (K, N, m)."""
        was = self.training
        self.eval()
        out = torch.cat([self.encode(x[i : i + batch_size].expand(self.members, -1, -1))
                         for i in range(0, len(x), batch_size)], 1)
        self.train(was)
        return out


def spc_loss(ensemble: SPCEnsemble, x: torch.Tensor, labels: torch.Tensor, agreed: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2, member by member: (K,) means over each member's batch of CE(h_j(f_j(x_i)), c_i) where
    a_i = 1 and ‖g_j(f_j(x_i)) − x_i‖₁ (ℓ1, §3.2) where a_i = 0; their sum is the batch's Eq. 2.
    ``x`` (K, B, D), ``labels``/``agreed`` (K, B): each member its own batch. ``noise`` (K, B, m) is
    added to the latent (§3.2). With no a_i = 1 it is the autoencoder pretraining loss (Alg. 1 lines 1-3)."""
    z = ensemble.encode(x)
    if noise is not None:
        z = z + noise
    rec = (ensemble.decode(z) - x).abs().sum(2)
    if not bool(agreed.any()):  # pretraining, or nothing agreed: h_j gets no term at all
        return rec.mean(1)
    logits = ensemble.classify(z)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(rec)
    return torch.where(agreed, ce, rec).mean(1)


def run_epochs(ensemble: SPCEnsemble, optimizer, x: torch.Tensor, labels: torch.Tensor, agreed: torch.Tensor,
               epochs: int, config: "SPCConfig", generator: torch.Generator) -> list[float]:
    """``epochs`` passes of Adam on Eq. 2 (summed over members), every member over its own shuffle
    of the N points; (K,) mean losses of the last epoch. Adam is elementwise, so one optimiser over
    the stacked weights is K independent ones."""
    k, n = ensemble.members, len(x)
    last = torch.full((k,), float("nan"))
    ensemble.train()
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=generator) for _ in range(k)]).to(x.device)  # (K, N)
        total = torch.zeros(k)
        for start in range(0, n, config.batch_size):
            idx = order[:, start : start + config.batch_size]
            if idx.shape[1] < 2:  # BatchNorm needs two rows; a one-row remainder waits for the next epoch
                continue
            noise = None
            if config.latent_noise > 0:
                noise = (torch.randn(k, idx.shape[1], config.latent_dim, generator=generator)
                         * config.latent_noise).to(x.device)
            losses = spc_loss(ensemble, x[idx], labels[idx], agreed[idx], noise)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            total += losses.detach().cpu() * idx.shape[1]
        last = total / n
    ensemble.eval()
    return last.tolist()


# --- ψ and Γ (Eq. 1) -------------------------------------------------------------------------------
def cluster_latent(latent: torch.Tensor, num_clusters: int, seed: int, covariance: str = "full",
                   restarts: int = 1) -> np.ndarray:
    """ψ: a GMM on one member's latent vectors (SPC-GMM, §3.2) → (N,) labels; scikit-learn's defaults
    but for ``covariance`` and ``restarts`` (its n_init), the best of that many fits by likelihood."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    z = latent.detach().cpu().double().numpy()
    # One BLAS thread: on an (N, 20) problem more threads only add start-up and contention cost
    # (5 fits on 1,800 × 20 on a busy 2-core machine: 4.2 s with the default threads, 0.35 s with one).
    with threadpool_limits(limits=1):
        return GaussianMixture(n_components=num_clusters, covariance_type=covariance, n_init=restarts,
                               random_state=seed).fit_predict(z)


@dataclass
class Consensus:
    """Γ's output (Eq. 1) plus what it was computed from."""

    labels: np.ndarray  # (N,) c_i: the most common aligned label (ties: the smallest)
    agreed: np.ndarray  # (N,) bool a_i: all K aligned labels equal
    aligned: np.ndarray  # (K, N) every member's labels in the reference member's numbering
    votes: np.ndarray  # (N, C) fraction of members giving each aligned label

    @property
    def num_agreed(self) -> int:
        return int(self.agreed.sum())


def consensus(labellings: np.ndarray, num_clusters: int, reference: int = 0) -> Consensus:
    """Γ of Eq. 1: align the K labellings (K, N) to member ``reference`` by the Hungarian algorithm
    (§3.2, the "direct" method), then c_i = the mode of the aligned labels and a_i = 1 iff they all agree."""
    labellings = np.asarray(labellings, dtype=np.int64)
    k, n = labellings.shape
    ref = labellings[reference]
    aligned = np.stack([ref if j == reference else align_labels(ref, labellings[j], num_clusters) for j in range(k)])
    votes = np.zeros((n, num_clusters), dtype=np.float64)
    np.add.at(votes, (np.broadcast_to(np.arange(n), (k, n)), aligned), 1.0)
    return Consensus(labels=votes.argmax(1), agreed=(aligned == aligned[:1]).all(0), aligned=aligned, votes=votes / k)


# --- Alg. 1's while loop ----------------------------------------------------------------------------
@dataclass
class LoopResult:
    final: Consensus  # the (c, a) with the most agreed points (first of equals): the labels the points keep (§3)
    agreed_per_round: list[int]  # |{i: a_i = 1}| at every computation of (c, a), the first before any round
    rounds: int  # rounds of Eq. 2 training run
    stopped: str  # "plateau" (the agreed set stopped growing) or "max_rounds"
    best_round: int = 0  # which computation ``final`` is (0 = before any training round)


def agreement_loop(compute: Callable[[Consensus | None], Consensus], train: Callable[[Consensus], None],
                   max_rounds: int, patience: int = 0, min_growth: int = 0,
                   on_round: Callable[[int, Consensus], None] | None = None) -> LoopResult:
    """Alg. 1 lines 4-9: compute (c, a) as in Eq. 1, train every member on Eq. 2 under it, recompute;
    continue while the number of agreed points increases. A computation *grows* the agreed set when
    it exceeds the largest so far by more than ``min_growth`` points; ``patience`` = how many more
    computations without growth the loop allows before it ends (both 0: Alg. 1's rule, the first
    computation that does not grow ends it); at most ``max_rounds`` training rounds. Each round
    trains under the latest (c, a); the result keeps the one with the most agreed points.
    ``compute`` gets the previous consensus (None the first time) to keep the cluster numbering stable."""
    state = best = compute(None)
    sizes, best_round, stale = [state.num_agreed], 0, 0
    if on_round:
        on_round(0, state)
    for rounds in range(1, max_rounds + 1):
        train(state)
        state = compute(state)
        sizes.append(state.num_agreed)
        if on_round:
            on_round(rounds, state)
        grew = state.num_agreed > best.num_agreed + min_growth
        if state.num_agreed > best.num_agreed:
            best, best_round = state, rounds
        stale = 0 if grew else stale + 1
        if stale > patience:
            return LoopResult(best, sizes, rounds, "plateau", best_round)
    return LoopResult(best, sizes, max_rounds, "max_rounds", best_round)


# --- the whole of SPC on features -------------------------------------------------------------------
@dataclass
class SPCResult:
    consensus: Consensus  # the final (c, a)
    loop: LoopResult
    ensemble: SPCEnsemble
    pretrain_losses: list[float]  # (K,) ℓ1 reconstruction after pretraining
    history: list[dict] = field(default_factory=list)  # per computation of (c, a): agreed count (+ ACC with labels)


def _seed(seed: int, *parts: int) -> int:
    out = seed
    for p in parts:
        out = (out * 1_000_003 + p * 7919 + 104_729) % (2**31 - 1)
    return out


@contextlib.contextmanager
def _one_cpu_thread(device):
    """torch on one CPU thread for SPC's training, restored afterwards: thousands of steps on
    (K, 128, 128) matrices, where OpenMP barriers cost more than a second thread gains (the digits on
    2 cores shared with another run: about 3 minutes a round on two threads, about 10 s on one)."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_spc(features: torch.Tensor, config: SPCConfig, labels: np.ndarray | None = None,
              progress: bool = False) -> SPCResult:
    """Algorithm 1 on (N, D) backbone features (L2-normalised here); ``labels`` only score the
    history (agreed-set and consensus accuracy per round, the paper's Fig. 2), never train."""
    with _one_cpu_thread(features.device):
        return _train_spc(features, config, labels, progress)


def _train_spc(features, config, labels, progress) -> SPCResult:
    from tqdm.auto import tqdm

    x = F.normalize(features.float(), dim=1)
    device, n, c = x.device, len(x), config.num_clusters
    with torch.random.fork_rng(devices=[]):  # initialisation from the seed; the caller's RNG untouched
        torch.manual_seed(_seed(config.seed, 1))
        ensemble = SPCEnsemble(config.members, x.shape[1], config.hidden_dim, config.latent_dim, c,
                               config.classifier_hidden).to(device)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(_seed(config.seed, 2))
    # Alg. 1 lines 1-3: every autoencoder on ℓ1 reconstruction of every point (Eq. 2 with no point agreed).
    nobody = torch.zeros(n, dtype=torch.bool, device=device)
    pretrain_losses = run_epochs(ensemble, optimizer, x, torch.zeros(n, dtype=torch.long, device=device), nobody,
                                 config.pretrain_epochs, config, generator)

    def compute(previous: Consensus | None) -> Consensus:
        # ψ per member: a member keeps its GMM seed from round to round, so the agreed set changes
        # with what the members learnt, not with fresh restarts of the mixture.
        latents = ensemble.latents(x)
        labellings = np.stack([cluster_latent(latents[j], c, _seed(config.seed, 3, j), config.gmm_covariance,
                                              config.gmm_restarts)
                               for j in range(config.members)])
        if previous is not None:  # the reference numbered like last round's consensus, so c_i keeps its numbers
            labellings[0] = align_labels(previous.labels, labellings[0], c)
        return consensus(labellings, c)

    def train(state: Consensus) -> None:
        target = torch.as_tensor(state.labels, device=device)
        agreed = torch.as_tensor(state.agreed, device=device)
        run_epochs(ensemble, optimizer, x, target, agreed, config.round_epochs, config, generator)

    history: list[dict] = []
    bar = tqdm(total=None, desc="SPC rounds", unit="round", disable=not progress)

    def on_round(r: int, state: Consensus) -> None:
        entry = {"round": r, "agreed": state.num_agreed}
        if labels is not None:
            from calibclust.metrics import hungarian_accuracy

            entry["acc"] = hungarian_accuracy(labels, state.labels).accuracy
            if state.num_agreed:
                entry["agreed_acc"] = hungarian_accuracy(labels[state.agreed], state.labels[state.agreed]).accuracy
        history.append(entry)
        bar.set_postfix(agreed=f"{state.num_agreed}/{n}")
        bar.update(1)

    loop = agreement_loop(compute, train, config.max_rounds, config.patience,
                          int(config.min_growth * n), on_round)
    bar.close()
    return SPCResult(loop.final, loop, ensemble, pretrain_losses, history)


def fit_head(head: nn.Module, features: torch.Tensor, targets: torch.Tensor, config: SPCConfig) -> float:
    """Train the model's head on raw backbone features (what it sees at inference) towards ``targets``
    (N, C) probabilities (soft cross-entropy); returns the last epoch's mean loss."""
    from calibclust.train.data import fit_head_to_targets

    return fit_head_to_targets(head, features, targets, config.head_epochs, config.lr, config.batch_size,
                               torch.Generator().manual_seed(_seed(config.seed, 4)))


class SPCMethod(ClusteringMethod):
    """SPC on the method interface: Algorithm 1 on the frozen backbone's features, then the model's
    MLP head trained towards the ensemble's consensus (see the module docstring)."""

    name = "spc"
    config_class = SPCConfig

    def row_names(self) -> list[str]:
        return ["SPC"]

    def _fit(self, data, backbone, backbone_info, out_dir, eval_data, resume) -> None:  # minutes at most: never resumes
        from calibclust.metadata import ModelMetadata
        from calibclust.models.backbones import backbone_label
        from calibclust.models.clustering import ClusteringModel
        from calibclust.train.data import embed_images, head_probabilities

        cfg = self.config
        start = time.perf_counter()
        with self._forked_rng():  # the head's initialisation from the seed; the caller's RNG untouched
            torch.manual_seed(_seed(cfg.seed, 5))
            model = ClusteringModel(backbone, self.n_clusters, cfg.head_hidden_dim, head_names=("clustering",),
                                    predict_head="clustering", mean=backbone_info["mean"],
                                    std=backbone_info["std"]).to(self.device).eval()
        z = embed_images(model, data.images, device=self.device).float()
        result = train_spc(z, cfg, labels=data.labels, progress=self.progress)
        final = result.consensus
        if cfg.head_targets == "votes":
            targets = torch.as_tensor(final.votes, dtype=torch.float32)
        else:
            targets = F.one_hot(torch.as_tensor(final.labels), self.n_clusters).float()
        with _one_cpu_thread(self.device):
            head_loss = fit_head(model.heads["clustering"], z, targets.to(self.device), cfg)
        probs = head_probabilities(model, z, "clustering")
        conf, pred = probs.max(1)
        self.model = model.eval()
        self.metadata = ModelMetadata(
            num_clusters=self.n_clusters, input_size=data.image_size, mean=tuple(model.mean.flatten().tolist()),
            std=tuple(model.std.flatten().tolist()), method=self.name, resize=data.resize, probs_head="clustering",
            calibrated=False, backbone=backbone_label(backbone), embedding_dim=model.feature_dim,
            # The default confidence cut (0.5) stands: trained on vote shares, the head's confidence
            # follows the fraction of members that agree, and under half is a split ensemble.
            train_stats={
                "n_images": data.num_images, "members": cfg.members,
                "agreed_per_round": result.loop.agreed_per_round, "rounds": result.loop.rounds,
                "stopped": result.loop.stopped, "kept_round": result.loop.best_round, "history": result.history,
                "cluster_sizes": torch.bincount(pred, minlength=self.n_clusters).tolist(),
                "mean_confidence": float(conf.mean()),
                # how often the head's argmax is the consensus label c_i on the training images
                "head_fidelity": float((pred.numpy() == final.labels).mean()), "head_loss": head_loss,
                "pretrain_losses": result.pretrain_losses, "seconds": time.perf_counter() - start,
                "config": cfg.to_dict(), "backbone_source": backbone_info.get("source", ""),
                "pretrained_backbone": backbone_info.get("pretrained", bool(backbone_info.get("source"))),
            },
        )
