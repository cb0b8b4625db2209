"""GCC ("Generative Calibration Clustering"): the diffusion model's equations (Eq. 3-6), Stage II's
losses (Eq. 9-11) on hand-made inputs, the stages' invariants, and a short fit that saves, loads,
exports and labels like any method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibclust.config import ConfigError
from calibclust.models.diffusion import ConditionalUNet, NoiseSchedule, denoising_loss, sample, timestep_embedding
from calibclust.train.gcc import (
    PROFILES,
    GCCConfig,
    category_matching_loss,
    cluster_mmd,
    from_diffusion,
    gaussian_kernel,
    pool_indices,
    median_bandwidth,
    reliable_metric_loss,
    stage_two_epoch,
    to_diffusion,
    train_head_on_kmeans,
)

from model_fixtures import assert_exports_and_labels, assert_round_trips

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --- the diffusion model (Eq. 3-6) -----------------------------------------------------------------
def test_linear_schedule_is_ddpms_at_1000_steps_and_ends_in_noise_at_fewer():
    s = NoiseSchedule.linear(1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[-1].item() == pytest.approx(4.0e-5, rel=0.1)
    short = NoiseSchedule.linear(100)
    assert short.betas[0].item() == pytest.approx(1e-3) and short.betas[-1].item() == pytest.approx(0.2)
    assert short.alpha_bar[-1].item() < 1e-4
    # σ(t) = √((1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t), and 0 at the first step (ᾱ_0 = 1).
    t = 37
    expected = math.sqrt((1 - s.alpha_bar[t - 1].item()) / (1 - s.alpha_bar[t].item()) * s.betas[t].item())
    assert s.sigma[t].item() == pytest.approx(expected) and s.sigma[0].item() == 0.0
    with pytest.raises(ValueError):
        NoiseSchedule.linear(0)


def test_forward_process_closed_form_and_one_reverse_step_inverts_it_with_the_true_noise():
    s = NoiseSchedule.linear(50)
    x0, eps = torch.full((2, 3, 4, 4), 0.6), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 20])
    xt = s.add_noise(x0, t, eps)
    ab = s.alpha_bar[20].item()
    torch.testing.assert_close(xt[1], math.sqrt(ab) * x0[1] + math.sqrt(1 - ab) * eps[1])
    # At the first step (ᾱ_1 = 1 − β_1) Eq. 5's mean with the true ε is x_0 exactly.
    torch.testing.assert_close(s.reverse_step(xt[:1], eps[:1], 0, None), x0[:1], atol=1e-5, rtol=0)
    # Without clipping the step is Eq. 5 as written: (x_t − β_t/√(1 − ᾱ_t) ε̂)/√(1 − β_t) + σ(t) z.
    eps_hat, z = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    beta = s.betas[20].item()
    eq5 = (xt[1:] - beta / math.sqrt(1 - ab) * eps_hat) / math.sqrt(1 - beta) + s.sigma[20].item() * z
    torch.testing.assert_close(s.reverse_step(xt[1:], eps_hat, 20, z, clip=False), eq5, atol=1e-5, rtol=1e-5)
    # Clipping changes the step only when the implied image leaves [−1, 1].
    torch.testing.assert_close(s.reverse_step(xt[1:], eps[1:], 20, z), s.reverse_step(xt[1:], eps[1:], 20, z, clip=False))
    assert not torch.allclose(s.reverse_step(xt[1:], eps[1:] - 5, 20, z), s.reverse_step(xt[1:], eps[1:] - 5, 20, z,
                                                                                         clip=False))


class _OracleDenoiser(torch.nn.Module):
    """The exact ε of data that is one image c: ε = (x_t − √ᾱ_t c) / √(1 − ᾱ_t)."""

    def __init__(self, schedule: NoiseSchedule, target: torch.Tensor):
        super().__init__()
        self.schedule, self.target = schedule, target

    def forward(self, x, t, labels):
        ab = self.schedule.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.target[labels]) / (1 - ab).sqrt()


def test_reverse_step_adds_sigma_times_the_fresh_noise():
    s = NoiseSchedule.linear(50)
    x, eps, z = torch.randn(2, 3, 4, 4), 0.1 * torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (1, 25, 49):
        torch.testing.assert_close(s.reverse_step(x, eps, t, z) - s.reverse_step(x, eps, t, torch.zeros_like(z)),
                                   s.sigma[t].item() * z)


class _GaussianDenoiser(torch.nn.Module):
    """The exact E[ε | x_t] of data whose pixels are i.i.d. N(c, s²): x_t ~ N(√ᾱ c, ᾱ s² + 1 − ᾱ), so
    E[ε | x_t] = √(1 − ᾱ) (x_t − √ᾱ c) / (ᾱ s² + 1 − ᾱ)."""

    def __init__(self, schedule: NoiseSchedule, c: float, s: float):
        super().__init__()
        self.schedule, self.c, self.s = schedule, c, s

    def forward(self, x, t, labels):
        ab = self.schedule.alpha_bar[t].float().view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.c) / (ab * self.s**2 + 1 - ab)


def test_ancestral_sampler_draws_from_the_data_distribution_with_the_exact_denoiser():
    """The whole chain, σ included: samples of N(0.2, 0.3²) data come out with that mean and spread
    (a wrong σ(t) at any step leaves its noise in the result)."""
    s = NoiseSchedule.linear(1000)  # at T = 100 the reverse variance β̃ is coarse enough to shrink the spread to 0.27
    out = sample(_GaussianDenoiser(s, 0.2, 0.3), s, torch.zeros(64, dtype=torch.long), 8,
                 torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(0.2, abs=0.015), out.mean().item()  # measured 0.194
    assert out.std().item() == pytest.approx(0.3, abs=0.015), out.std().item()  # measured 0.293


def test_ancestral_sampler_with_the_exact_noise_returns_each_clusters_image():
    s = NoiseSchedule.linear(40)
    targets = torch.stack([torch.full((3, 8, 8), -0.5), torch.linspace(-0.9, 0.9, 192).view(3, 8, 8)])
    labels = torch.tensor([1, 0, 1])
    out = sample(_OracleDenoiser(s, targets), s, labels, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, targets[labels], atol=1e-4, rtol=0)
    again = sample(_OracleDenoiser(s, targets * 0 + 2.0), s, labels, 8, torch.Generator().manual_seed(0))
    assert again.max().item() == 1.0  # clipped to the image range


def test_unet_keeps_the_shape_starts_at_zero_and_depends_on_time_and_cluster():
    torch.manual_seed(0)
    net = ConditionalUNet(num_classes=4, channels=8, multipliers=(1, 2), blocks=1, dropout=0.0).eval()
    x = torch.randn(3, 3, 16, 16)
    t, y = torch.tensor([0, 5, 9]), torch.tensor([0, 1, 3])
    assert net(x, t, y).shape == x.shape and net(x, t, y).abs().max().item() == 0.0  # zero-initialised output
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    base = net(x, t, y)
    assert not torch.allclose(base, net(x, t, torch.tensor([1, 1, 3])))  # ŷ conditions the estimate
    assert not torch.allclose(base, net(x, torch.tensor([3, 5, 9]), y))  # so does t
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 3, 15, 15), t[:1], y[:1])
    emb = timestep_embedding(torch.tensor([0, 1]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))


def test_denoising_loss_is_the_mse_to_the_drawn_noise_and_training_lowers_it():
    torch.manual_seed(0)
    s = NoiseSchedule.linear(20)
    net = ConditionalUNet(num_classes=2, channels=8, multipliers=(1, 2), dropout=0.0)
    x0 = torch.cat([torch.full((8, 3, 8, 8), -0.8), torch.full((8, 3, 8, 8), 0.8)])
    y = torch.tensor([0] * 8 + [1] * 8)
    g = torch.Generator().manual_seed(1)
    assert denoising_loss(net, s, x0, y, g).item() == pytest.approx(1.0, abs=0.15)  # ε̂ = 0: E‖ε‖²/dim = 1
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    first = None
    for _ in range(60):
        loss = denoising_loss(net, s, x0, y, g)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


# --- Stage II's losses -----------------------------------------------------------------------------
def test_cluster_mmd_is_the_per_cluster_kernel_distance_between_mean_embeddings():
    bw = torch.tensor(1.0)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # One pair: K(a,a) + K(b,b) − 2K(a,b) = 2 − 2·exp(−2).
    assert cluster_mmd(a, torch.tensor([0]), b, torch.tensor([0]), 2, bw).item() == pytest.approx(2 - 2 * math.exp(-2))
    # Same features on both sides: 0; features are L2-normalised first (scale does not matter).
    real = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    assert cluster_mmd(real, labels, real * 5, labels, 2, bw).item() == pytest.approx(0.0, abs=1e-6)
    # Means over each cluster's pairs: cluster 1 has two real rows u, v and one generated w.
    u, v, w = F.normalize(torch.tensor([[0.0, 2.0], [1.0, 1.0], [1.0, 0.0]]), dim=1)
    k = lambda p, q: math.exp(-float((p - q).pow(2).sum()))  # noqa: E731
    d_r = (k(u, u) + k(u, v) + k(v, u) + k(v, v)) / 4
    d_rg = (k(u, w) + k(v, w)) / 2
    expected = d_r + 1.0 - 2 * d_rg  # cluster 0 has no generated image: it adds nothing
    got = cluster_mmd(real, labels, torch.tensor([[5.0, 0.0]]), torch.tensor([1]), 2, bw)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(gaussian_kernel(x, x, torch.tensor(2.0))[0, 2], torch.tensor(math.exp(-2.0)))
    # The default bandwidth is the median squared distance between distinct rows of both sets:
    # here distances² 2, 2, 4 (each twice) → σ² = 2.
    assert median_bandwidth(x).item() == pytest.approx(2.0)
    one, two = x[:2], x[2:]
    assert cluster_mmd(one, torch.tensor([0, 0]), two, torch.tensor([0]), 1).item() == pytest.approx(
        cluster_mmd(one, torch.tensor([0, 0]), two, torch.tensor([0]), 1, torch.tensor(2.0)).item())


def test_category_matching_contrasts_between_and_within_cluster_cosines():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert category_matching_loss(z, torch.tensor([0, 0, 1])).item() == pytest.approx(0.0 - 1.0)
    # Cluster 0 = rows {0, 2} (cosine 0, plus the diagonal's three 1s); between: 0.6 and 0.8, each twice.
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    within = (1 + 1 + 1 + 0.0 * 2) / 5
    between = (0.6 * 2 + 0.8 * 2) / 4
    assert category_matching_loss(z, torch.tensor([0, 1, 0])).item() == pytest.approx(between - within)


def test_reliable_metric_loss_charges_only_clusters_above_the_generation_label():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    # Row 1 generated for cluster 1: only cluster 0 exceeds it, (0.5 − 0.3)²; row 0 for cluster 0: nothing.
    assert reliable_metric_loss(p, torch.tensor([0, 1])).item() == pytest.approx((0.0 + 0.04) / 2)
    assert reliable_metric_loss(p[:1], torch.tensor([2])).item() == pytest.approx(0.3**2 + 0.1**2)
    q = p.clone().requires_grad_(True)
    reliable_metric_loss(q, torch.tensor([1, 1])).backward()
    assert q.grad[0, 2].item() == 0.0 and q.grad[0, 0].item() > 0 > q.grad[0, 1].item()


# --- the stages' invariants --------------------------------------------------------------------------
def test_images_round_trip_between_uint8_and_the_diffusions_range():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    x = to_diffusion(images, 32)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(from_diffusion(x, (32, 32)), images)
    assert from_diffusion(to_diffusion(images, 16), (24, 32)).shape == (4, 24, 32, 3)  # non-square inputs too


def test_pool_pairs_every_real_image_with_a_generated_image_of_its_cluster():
    pool_labels = np.repeat(np.arange(3), 4)
    wanted = torch.tensor([2, 0, 2, 1, 1, 2])
    idx = pool_indices(pool_labels, wanted, torch.Generator().manual_seed(0))
    assert pool_labels[idx].tolist() == wanted.tolist()


def test_stage_one_head_learns_the_kmeans_pseudo_labels_of_separated_features():
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(128)[:4] * 5  # the small backbone's feature width
    feats = centres.repeat_interleave(30, 0) + 0.3 * torch.randn(120, 128, generator=g)
    model = ClusteringModel(build_backbone("small", input_size=16), 4, 32, head_names=("clustering",),
                            predict_head="clustering")
    config = GCCConfig(num_clusters=4, head_epochs=40, head_lr=1e-2, batch_size=32)
    pseudo, loss = train_head_on_kmeans(model, feats, config, g)
    assert len(set(pseudo[i * 30].item() for i in range(4))) == 4  # K-means found the 4 blobs
    assert (model.heads["clustering"](feats).argmax(1) == pseudo).float().mean() == 1.0 and loss < 0.1


def test_stage_two_trains_weights_but_keeps_batchnorm_statistics():
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small", input_size=16), 3, 16, head_names=("clustering",),
                            predict_head="clustering")
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    pool = np.random.default_rng(1).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    labels = torch.arange(24) % 3
    parts = stage_two_epoch(model, opt, images, labels, pool, np.repeat(np.arange(3), 3),
                            GCCConfig(num_clusters=3, batch_size=8), torch.Generator().manual_seed(0), "cpu")
    assert set(parts) == {"l_d", "l_cwm", "l_ml", "loss"} and parts["loss"] == pytest.approx(
        parts["l_d"] + parts["l_cwm"] + parts["l_ml"], abs=1e-5)
    after = model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    # An ablation (the paper's GCC-d) trains on the other two terms and still reports all three.
    ablated = stage_two_epoch(model, opt, images, labels, pool, np.repeat(np.arange(3), 3),
                              GCCConfig(num_clusters=3, batch_size=8, losses=("cwm", "ml")),
                              torch.Generator().manual_seed(0), "cpu")
    assert ablated["loss"] == pytest.approx(ablated["l_cwm"] + ablated["l_ml"], abs=1e-5) and "l_d" in ablated


def test_config_is_strict_and_puts_the_paper_one_value_away():
    config = GCCConfig()
    assert config.setting("diffusion_steps") == PROFILES["cpu"]["diffusion_steps"]
    paper = GCCConfig(profile="paper")
    assert (paper.setting("diffusion_steps"), paper.setting("diffusion_epochs"), paper.setting("unet_channels")) == (
        1000, 300, 128)
    assert (paper.head_lr, paper.setting("diffusion_lr"), paper.setting("cluster_lr"), paper.cluster_epochs,
            paper.diffusion_round_epochs) == (1e-4, 2e-4, 1e-4, 5, 2)
    with pytest.raises(ConfigError) as err:
        GCCConfig(num_clusters=1, batch_size=1, diffusion_size=30, cluster_lr=0, losses=("d", "l2"))
    assert len(err.value.problems) == 5, err.value.problems
    assert GCCConfig(losses=["cwm", "ml"]).losses == ("cwm", "ml")  # GCC-d of the paper's Fig. 2a
    with pytest.raises(ConfigError, match="profile"):
        GCCConfig(profile="gpu")
    assert GCCConfig.from_dict(GCCConfig(unet_multipliers=(1, 2)).to_dict()).unet_multipliers == (1, 2)


# --- the method end to end -----------------------------------------------------------------------------
TINY = dict(head_epochs=30, diffusion_epochs=2, diffusion_steps=10, unet_channels=8, unet_multipliers=(1, 2),
            rounds=2, pool_per_cluster=4, cluster_epochs=1, diffusion_round_epochs=1, batch_size=50)


def test_gcc_fits_saves_loads_exports_and_labels_like_any_method(digits_folder, tmp_path):
    """A tiny fit on 200 digits from a random backbone: every stage runs and is recorded, the given
    backbone is untouched, and the model goes through save/load, ONNX export and `calibclust label`."""
    pytest.importorskip("onnxruntime")
    from calibclust.models.backbones import build_backbone
    from calibclust.train.data import TrainingData
    from calibclust.train.methods import get_method

    data = TrainingData.from_folder(digits_folder, 32, progress=False)
    torch.manual_seed(0)
    backbone = build_backbone("small", input_size=32).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    config = GCCConfig(num_clusters=10, **TINY)
    method = get_method("gcc")(10, config).fit(data, backbone, {"source": "test"}, out_dir=tmp_path / "run", eval_data=data)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items()), "fit changed the given backbone"
    stats = method.metadata.train_stats
    assert [r["stage"] for r in stats["history"]] == ["stage1", "diffusion", "round1", "round2"]
    assert all("eval_acc" in r for r in stats["history"]) and {"l_d", "l_cwm", "l_ml"} <= set(stats["history"][-1])
    assert set(stats["seconds"]) == {"stage1_head", "diffusion", "sampling", "stage2"}
    assert (tmp_path / "run" / "history.json").is_file() and (tmp_path / "run" / "generated_round2.png").is_file()
    meta = method.metadata
    assert (meta.method, meta.calibrated, meta.probs_head) == ("gcc", False, "clustering")
    probs = method.predict_proba(data.images)
    assert probs.shape == (200, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert method.row_names() == ["GCC"] and method.seconds["GCC"] > 0

    assert_round_trips(method, data.images, tmp_path / "model")

    assert_exports_and_labels(method, data.images, data.paths, digits_folder, tmp_path / "onnx")
