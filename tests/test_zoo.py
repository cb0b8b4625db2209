"""The data zoo (calibclust.zoo) and the label-free shortcut check (calibclust.shortcut)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibclust import zoo
from calibclust.shortcut import SHORTCUT_THRESHOLD, image_statistics, shortcut_check


@pytest.fixture(scope="module")
def colour_digits():
    return zoo.ZOO["digits-colour"].make(0)


@pytest.fixture(scope="module")
def plain_digits():
    return zoo.ZOO["digits"].make(0)


def _pixel_kmeans(images, k, seed=0):
    """A clustering of raw pixels: on colour-nuisance data it follows colour (measured ACC 0.13)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(images.reshape(len(images), -1) / 255.0)


def test_bench_zoo_lists_exactly_the_zoo():
    from calibclust.bench import ZOO_SETS

    assert ZOO_SETS == tuple(zoo.ZOO)


def test_heldout_split_is_every_fifth_image_of_each_class():
    labels = np.repeat(np.arange(3), [10, 7, 5])
    held = zoo.heldout_mask(labels)
    assert held.sum() == 2 + 1 + 1
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        assert held[idx].tolist() == [(i + 1) % 5 == 0 for i in range(len(idx))]


def test_make_zoo_set_writes_split_and_ood_folders_once(tmp_path):
    paths = zoo.make_zoo_set("digits-colour", tmp_path / "z", n_ood=20)
    manifest = json.loads((paths["root"] / "zoo.json").read_text())
    train = sorted(paths["train"].rglob("*.png"))
    held = sorted(paths["heldout"].rglob("*.png"))
    assert (len(train), len(held)) == (manifest["train"], manifest["heldout"]) == (1442, 355)
    assert not {p.name for p in train} & {p.name for p in held}, "an image is in both splits"
    assert sorted(p.name for p in paths["train"].iterdir()) == [str(c) for c in range(10)]
    assert len(list(paths["near"].iterdir())) == len(list(paths["far"].iterdir())) == 20
    stamp = train[0].stat().st_mtime_ns
    zoo.make_zoo_set("digits-colour", tmp_path / "z", n_ood=20)
    assert train[0].stat().st_mtime_ns == stamp, "a second call with the same seed rewrote the set"
    with pytest.raises(Exception, match="unknown zoo set"):
        zoo.make_zoo_set("cifar", tmp_path / "c")
    with pytest.raises(Exception, match="holds another zoo set"):
        zoo.make_zoo_set("digits", tmp_path / "z", n_ood=20)


def test_colour_nuisance_is_independent_of_the_digit(colour_digits):
    """Mean colour says nothing about the digit (chance-corrected accuracy near 0); the digit is
    still drawn (luma contrast kept)."""
    images, labels, _ = colour_digits
    check = shortcut_check(images, labels)
    assert check.explained["mean colour"] < 0.1, check.explained
    luma = images.astype(float) @ [0.299, 0.587, 0.114]
    spread = luma.max(axis=(1, 2)) - luma.min(axis=(1, 2))
    assert np.percentile(spread, 1) > 50, "some digits are invisible against their paper"


def test_shortcut_check_fires_when_clusters_follow_colour(colour_digits):
    images, labels, _ = colour_digits
    check = shortcut_check(images, _pixel_kmeans(images, 10))
    assert check.fired and check.strongest == "mean colour", check.explained
    assert "clusters follow mean colour" in check.message and "greyscale" in check.message
    print("colour digits, pixel K-means:", check.explained)


def test_shortcut_check_is_silent_on_digit_clusters(plain_digits, colour_digits):
    """True classes and pixel K-means of plain digits are not explained by trivial statistics
    (measured at most 0.13 on every statistic; the threshold is 0.3)."""
    for name, (images, labels, _) in (("digits", plain_digits), ("colour digits", colour_digits)):
        check = shortcut_check(images, labels)
        assert not check.fired and max(check.explained.values()) < 0.25, (name, check.explained)
    images, labels, _ = plain_digits
    check = shortcut_check(images, _pixel_kmeans(images, 10))
    assert not check.fired, check.explained


def test_shortcut_check_is_silent_on_letters_in_many_fonts():
    try:
        images, labels, _ = zoo.ZOO["letters-fonts"].make(0)
    except Exception as exc:  # fewer than 20 fonts with Latin capitals on this machine
        pytest.skip(f"letters-fonts unavailable: {exc}")
    check = shortcut_check(images, labels)
    assert not check.fired and max(check.explained.values()) < 0.25, check.explained


def test_shortcut_check_degenerate_inputs():
    images = np.zeros((30, 8, 8, 3), np.uint8)
    assert not shortcut_check(images, np.zeros(30, int)).fired, "one cluster: nothing to explain"
    stats = image_statistics(images)
    assert all(np.isfinite(v).all() for v in stats.values()), "blank images give finite statistics"
    # Foreground area and aspect ratio of a known rectangle on a black frame.
    box = np.zeros((1, 20, 20, 3), np.uint8)
    box[0, 2:18, 5:9] = 255
    stats = image_statistics(box)
    assert stats["foreground area"][0, 0] == pytest.approx(16 * 4 / 400)
    assert stats["aspect ratio"][0, 0] == pytest.approx(np.log(16 / 4))
    assert 0.22 < SHORTCUT_THRESHOLD < 0.38, "between the measured legitimate and colour-following scores"


def test_emoji_set_has_ten_balanced_classes():
    if not zoo.os.path.isfile(zoo.EMOJI_FONT):
        pytest.skip(f"{zoo.EMOJI_FONT} missing (Debian: fonts-noto-color-emoji)")
    images, labels, names = zoo.ZOO["emoji"].make(0)
    assert images.shape == (10 * zoo.EMOJI_PER_CLASS, 32, 32, 3) and names == list(zoo.EMOJI_NAMES)
    assert np.bincount(labels).tolist() == [zoo.EMOJI_PER_CLASS] * 10
    # Backgrounds vary per image, so the class is not its mean colour alone.
    check = shortcut_check(images, labels)
    assert check.explained["mean colour"] < 0.25, check.explained


def test_bench_zoo_fast_on_digits(tmp_path):
    """`calibclust bench zoo --fast digits`: the whole pipeline on the train split, figures on the
    held-out split. Measured (2 cores): Cal ACC 0.78 (ECE 0.12), Clu ACC 0.75 (ECE 0.18), near/far-OOD
    AUROC 1.00, 4% of held-out digits flagged OOD, K-means on pixels 0.79 / on features 0.72."""
    import subprocess
    import sys

    out = tmp_path / "zoo"
    cmd = [sys.executable, "-m", "calibclust", "bench", "zoo", "--fast", "digits", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "every figure on the held-out split" in proc.stdout and "digits" in proc.stdout.splitlines()[-1]
    row = json.loads((out / "zoo.json").read_text())[0]
    print({k: v for k, v in row.items() if k != "settings"})
    assert row["heldout"] == 355 and row["train"] == 1442, row
    assert row["cal_acc"] >= 0.65 and row["cal_ece"] <= 0.2, row
    assert row["near_auroc"] >= 0.9 and row["far_auroc"] >= 0.95 and row["flagged_ood"] <= 0.15, row
    assert 0.7 <= row["kmeans_pixels"] <= 0.88, row
    # A second call reuses the finished set; other settings are refused, not mixed in.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((out / "zoo.json").read_text())[0] == row
    other = subprocess.run([c for c in cmd if c != "--fast"], capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "other settings" in other.stderr, other.stderr[-500:]
