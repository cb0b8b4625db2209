"""Batched MoCo-v2 augmentations: each op against torchvision's per-image reference, the
parameter distributions, determinism, and the composed pipeline's identity cases."""

import pytest

torch = pytest.importorskip("torch")
TF = pytest.importorskip("torchvision.transforms.functional")

from calibclust.augment import (  # noqa: E402
    AugmentConfig,
    MoCoAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    preprocess,
    resized_crop,
)


# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _images(n=6, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


def _float(n=6, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


NO_AUG = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur="off")


@pytest.mark.parametrize(
    "ours, ref, factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 0.8, 1.0, 1.2, 1.4, 0.7]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 0.8, 1.0, 1.2, 1.4, 0.7]),
        (adjust_saturation, TF.adjust_saturation, [0.6, 0.8, 1.0, 1.2, 1.4, 0.7]),
        (adjust_hue, TF.adjust_hue, [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1]),
    ],
)
def test_colour_ops_match_torchvision_per_image(ours, ref, factors):
    x = _float()
    f = torch.tensor(factors)
    got = ours(x.clone(), f)
    want = torch.stack([ref(x[i], float(f[i])) for i in range(len(f))])
    assert torch.allclose(got, want, atol=2e-6), (got - want).abs().max()


def test_hue_of_grey_and_saturated_pixels():
    # Grey pixels have no hue and must stay put; pure red rotated by 1/3 turn becomes green.
    x = torch.zeros(2, 3, 2, 2)
    x[0] = 0.5
    x[1, 0] = 1.0
    out = adjust_hue(x, torch.tensor([0.25, 1 / 3]))
    assert torch.allclose(out[0], x[0])
    assert torch.allclose(out[1, 1], torch.ones(2, 2), atol=1e-5) and out[1, 0].abs().max() < 1e-5


def test_gaussian_blur_matches_torchvision():
    x = _float(4, 32, 32)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    got = gaussian_blur(x, sigma)
    k = 13  # our kernel spans ±ceil(3 σ_max) = ±6
    want = torch.stack([TF.gaussian_blur(x[i : i + 1], [k, k], [float(s), float(s)])[0] for i, s in enumerate(sigma)])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_resized_crop_without_scaling_is_an_exact_copy_and_flip_mirrors():
    x = _float(2, 32, 32)
    crop = torch.tensor([[5.0, 7.0, 16.0, 16.0], [0.0, 16.0, 16.0, 16.0]])
    out = resized_crop(x, crop, torch.tensor([False, True]), (16, 16))
    assert torch.allclose(out[0], x[0, :, 5:21, 7:23], atol=1e-6)
    assert torch.allclose(out[1], x[1, :, 0:16, 16:32].flip(-1), atol=1e-6)


def test_resized_crop_upscales_like_interpolate_inside_the_box():
    x = _float(1, 16, 16)
    crop = torch.tensor([[4.0, 4.0, 8.0, 8.0]])
    out = resized_crop(x, crop, torch.tensor([False]), (16, 16))
    ref = torch.nn.functional.interpolate(x[:, :, 4:12, 4:12], size=(16, 16), mode="bilinear", align_corners=False)
    # Inside the box both sample the same pixels; the outermost ring differs by design (we read
    # the real neighbours outside the box, interpolate clamps to the box edge).
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)


def test_no_op_config_is_identity_and_flip_only_mirrors():
    images = _images(5, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = MoCoAugment(AugmentConfig(**NO_AUG), 32)(images, g)
    assert torch.allclose(out, preprocess(images), atol=1e-5)
    flip = MoCoAugment(AugmentConfig(**dict(NO_AUG, flip_p=1.0)), 32)(images, g)
    assert torch.allclose(flip, preprocess(images).flip(-1), atol=1e-5)


def test_grayscale_p1_gives_equal_channels():
    images = _images(4, 32, 32)
    cfg = AugmentConfig(**dict(NO_AUG, grayscale_p=1.0), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = MoCoAugment(cfg, 32)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)


def test_sampled_parameters_follow_the_moco_v2_distributions():
    aug = MoCoAugment(AugmentConfig(), 32)
    p = aug.sample(20000, 32, 32, torch.Generator().manual_seed(0))
    top, left, h, w = p.crop.unbind(1)
    area = h * w / (32 * 32)
    assert area.min() >= 0.2 - 0.05 and area.max() <= 1.0  # scale=(0.2, 1), pixel rounding
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    assert abs(p.flip.float().mean() - 0.5) < 0.02
    assert abs(p.jitter.float().mean() - 0.8) < 0.02
    assert abs(p.gray.float().mean() - 0.2) < 0.02
    b, c, s, hue = p.factors.unbind(1)
    assert b.min() >= 0.6 and b.max() <= 1.4 and c.min() >= 0.6 and s.max() <= 1.4
    assert hue.min() >= -0.1 and hue.max() <= 0.1
    assert (p.order.sort(1).values == torch.arange(4)).all()  # a permutation per sample
    assert p.blur_sigma is None  # no blur at 32 px (CDC appendix B.1)


def test_blur_only_above_32_pixels():
    g = torch.Generator().manual_seed(0)
    assert MoCoAugment(AugmentConfig(), 32).sample(8, 32, 32, g).blur_sigma is None
    p = MoCoAugment(AugmentConfig(), 64).sample(4000, 64, 64, g)
    applied = p.blur_sigma > 0
    assert abs(applied.float().mean() - 0.5) < 0.04
    assert p.blur_sigma[applied].min() >= 0.1 and p.blur_sigma.max() <= 2.0
    assert MoCoAugment(AugmentConfig(blur="on"), 32).sample(8, 32, 32, g).blur_sigma is not None


def test_views_are_deterministic_under_the_generator_and_vary_across_seeds():
    images = _images(16, 48, 48)
    aug = MoCoAugment(AugmentConfig(), 48)
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(images, torch.Generator().manual_seed(3))
    c = aug(images, torch.Generator().manual_seed(4))
    assert a.shape == (16, 3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_output_size_can_differ_from_input():
    out = MoCoAugment(AugmentConfig(), 24)(_images(3, 40, 30), torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 24, 24)


def test_config_validation_and_round_trip():
    cfg = AugmentConfig(blur="on", jitter_p=0.5)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        AugmentConfig(jitter_p=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(crop_scale=(0.5, 0.2))


@pytest.mark.gpu
def test_cuda_views_match_cpu_views():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images = _images(32, 64, 64)
    aug = MoCoAugment(AugmentConfig(), 64)
    params = aug.sample(32, 64, 64, torch.Generator().manual_seed(0))
    cpu = aug.apply(images, params)
    gpu = aug.apply(images.cuda(), params).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4), (cpu - gpu).abs().max()


# --- presets beyond MoCo-v2 (geometry, colour) --------------------------------------------------


def _params_equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("crop", "flip", "jitter", "factors", "order", "gray"))


def test_mocov2_preset_is_mocov2_and_draws_the_same_views():
    """The default and the "mocov2" preset give the same parameters from the same generator (runs
    and resumes from before the presets stay bit-for-bit), and no extra parameters."""
    default, preset = MoCoAugment(AugmentConfig(), 16), MoCoAugment(AugmentConfig.from_preset("mocov2"), 16)
    a = default.sample(32, 16, 16, torch.Generator().manual_seed(3))
    b = preset.sample(32, 16, 16, torch.Generator().manual_seed(3))
    assert _params_equal(a, b) and a.extra == b.extra == {}
    # The extra draws of the other presets come after MoCo-v2's, so its part of a view is unchanged.
    c = MoCoAugment(AugmentConfig.from_preset("robust"), 16).sample(32, 16, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a.crop, c.crop) and torch.equal(a.flip, c.flip)
    assert set(c.extra) == {"geometry", "channels", "invert"}
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        AugmentConfig.from_preset("strong")


def test_zoom_out_shrinks_rotates_and_moves_the_content():
    """A white square on black, zoom-out to exactly 0.5 of the frame without rotation: the square's
    area falls to a quarter; with a 90° rotation a horizontal bar turns vertical."""
    img = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    img[:, 8:24, 8:24] = 255
    cfg = AugmentConfig(**NO_AUG, zoom_out_p=1.0, zoom_out_scale=(0.5, 0.5), mean=(0, 0, 0), std=(1, 1, 1))
    aug = MoCoAugment(cfg, 32)
    params = aug.sample(1, 32, 32, torch.Generator().manual_seed(0))
    out = aug.apply(img, params)
    area_before = 16 * 16 / 32 ** 2
    area_after = float((out[0, 0] > 0.5).float().mean())
    assert area_after == pytest.approx(area_before / 4, rel=0.15), area_after
    bar = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    bar[:, 14:18, 4:28] = 255
    params.extra["geometry"] = torch.tensor([[1.0, torch.pi / 2, 0.0, 0.0]])
    turned = aug.apply(bar, params)[0, 0] > 0.5
    rows, cols = turned.any(1).sum().item(), turned.any(0).sum().item()
    assert rows > 20 and cols < 8, (rows, cols)


def test_channel_permutation_and_inversion():
    imgs = _images(64, 8, 8)
    cfg = AugmentConfig(**NO_AUG, channel_shuffle_p=1.0, invert_p=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    aug = MoCoAugment(cfg)
    params = aug.sample(64, 8, 8, torch.Generator().manual_seed(1))
    out = aug.apply(imgs, params)
    x = imgs.permute(0, 3, 1, 2).float() / 255
    perm, inv = params.extra["channels"], params.extra["invert"]
    assert sorted(perm[0].tolist()) == [0, 1, 2] and 16 < int(inv.sum()) < 48
    expected = x.gather(1, perm[:, :, None, None].expand_as(x))
    expected = torch.where(inv.view(-1, 1, 1, 1), 1 - expected, expected)
    assert torch.allclose(out, expected, atol=1e-6)


def test_pretrain_cli_records_the_preset(tmp_path):
    import argparse

    from calibclust.pretrain import config_from_args, register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", str(tmp_path), "--out", str(tmp_path / "o"), "--augment", "colour",
                              "--blur", "off"])
    config = config_from_args(args)
    assert config.augment.preset == "colour" and config.augment.invert_p == 0.5 and config.augment.blur == "off"
    assert config.to_dict()["augment"]["preset"] == "colour"
