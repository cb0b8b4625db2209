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


def test_heldout_mask_of_the_training_commands_is_every_fifth_image_of_each_class():
    """`train cdc` / `train compare` / `cdc-ablation` score on this split without --heldout."""
    labels = np.repeat(np.arange(3), [10, 7, 5])
    from calibclust.train.cli import heldout_mask

    held = heldout_mask(labels)
    assert held.sum() == 2 + 1 + 1
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        assert held[idx].tolist() == [(i + 1) % 5 == 0 for i in range(len(idx))]


def _relative(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def test_make_zoo_set_writes_images_once_and_fits_split_as_link_trees(tmp_path):
    paths = zoo.make_zoo_set("digits-colour", tmp_path / "z", n_ood=20)
    manifest = json.loads((paths["root"] / "zoo.json").read_text())
    images, train, held = (_relative(paths[k]) for k in ("images", "train", "heldout"))
    assert len(images) == 1797 and sorted(train + held) == images, "every image in exactly one split"
    assert (len(train), len(held)) == (manifest["train"], manifest["heldout"])
    assert 0.15 < len(held) / len(images) < 0.25, len(held)
    assert sorted(p.name for p in paths["images"].iterdir()) == [str(c) for c in range(10)]
    # The split trees point at the one copy under images/ (links, or copies where links fail).
    for split, rel in (("train", train[0]), ("heldout", held[-1])):
        assert (paths[split] / rel).read_bytes() == (paths["images"] / rel).read_bytes()
        if (paths[split] / rel).is_symlink():
            assert (paths[split] / rel).resolve() == (paths["images"] / rel).resolve()
    assert len(list(paths["near"].iterdir())) == len(list(paths["far"].iterdir())) == 20
    stamp = (paths["images"] / images[0]).stat().st_mtime_ns
    zoo.make_zoo_set("digits-colour", tmp_path / "z", n_ood=20)
    assert (paths["images"] / images[0]).stat().st_mtime_ns == stamp, "a second call with the same seed rewrote the set"
    with pytest.raises(Exception, match="unknown zoo set"):
        zoo.make_zoo_set("cifar", tmp_path / "c")
    with pytest.raises(Exception, match="holds another zoo set"):
        zoo.make_zoo_set("digits", tmp_path / "z", n_ood=20)
    # A set written under the earlier rule (every fifth image per class) has no held-out fraction.
    (paths["root"] / "zoo.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "heldout_fraction"}))
    with pytest.raises(Exception, match="holds another zoo set"):
        zoo.make_zoo_set("digits-colour", tmp_path / "z", n_ood=20)


def test_zoo_heldout_split_is_fits_heldout_split(tmp_path):
    """fit on ROOT/images with the zoo's fraction holds out exactly ROOT/heldout: the folder decoded
    as fit decodes it, split by the rule and paths fit uses."""
    from calibclust.app.fitting import INPUT_SIZE
    from calibclust.train.data import TrainingData
    from calibclust.train.profiles import heldout_by_path_hash

    paths = zoo.make_zoo_set("digits", tmp_path / "z", n_ood=4)
    data = TrainingData.from_folder(paths["images"], INPUT_SIZE, progress=False)
    fit_held = heldout_by_path_hash(data.paths, zoo.ZOO_HELDOUT_FRACTION)
    assert sorted(np.asarray(data.paths)[fit_held].tolist()) == _relative(paths["heldout"])
    assert sorted(np.asarray(data.paths)[~fit_held].tolist()) == _relative(paths["train"])
    # The labels fit reports with are the zoo's classes.
    assert data.class_names == json.loads((paths["root"] / "zoo.json").read_text())["classes"]


def test_heldout_features_pretrain_as_fit_on_the_train_split(tmp_path):
    """`bench choose-k`'s features, in this process: fit's MoCo-v2 profile on the train split (one
    epoch here), then the held-out split embedded; reused for the same settings, refused for others."""
    from calibclust.train.profiles import PROJ_DIM, pretrain_batch

    settings = zoo.ZooSettings(pretrain_epochs=1, n_ood=4)
    out = tmp_path / "ck"
    features, labels = zoo.heldout_features("digits", out, settings, seed=0)
    held = _relative(out / "data" / "heldout")
    assert features.shape[0] == len(held) and labels.tolist() == [int(p.split("/")[0]) for p in held]
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-4), "rows are L2-normalised"
    config = json.loads((out / "pretrain" / "config.json").read_text())
    config = config.get("config", config)
    n_train = len(_relative(out / "data" / "train"))
    assert (config["epochs"], config["batch_size"], config["proj_dim"]) == (1, pretrain_batch(n_train), PROJ_DIM), config
    stamp = (out / "heldout-features.npy").stat().st_mtime_ns
    again, _ = zoo.heldout_features("digits", out, settings, seed=0)
    assert (out / "heldout-features.npy").stat().st_mtime_ns == stamp and np.array_equal(again, features)
    with pytest.raises(Exception, match="other settings"):
        zoo.heldout_features("digits", out, zoo.ZooSettings(pretrain_epochs=2, n_ood=4), seed=0)


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
    assert "clusters follow mean colour" in check.message and "--input-filter gradient" in check.message
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


def test_bench_zoo_fast_on_digits(tmp_path, capsys):
    """`calibclust bench zoo --fast digits`: calibclust fit on the set's images (15 pretraining
    epochs), figures on fit's held-out split, which is the zoo's. Measured before the zoo took fit's
    split (2 cores, every fifth digit held out): Cal ACC 0.78 (ECE 0.12), near/far-OOD AUROC 1.00,
    4 % of held-out digits flagged OOD, K-means on pixels 0.79 / on features 0.72."""
    from calibclust.cli import main

    out = tmp_path / "zoo"
    argv = ["bench", "zoo", "--fast", "digits", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "every figure on fit's held-out split" in printed and "digits" in printed.splitlines()[-1]
    row = json.loads((out / "zoo.json").read_text())[0]
    print({k: v for k, v in row.items() if k != "settings"})
    run = json.loads((out / "digits" / "fit" / "run.json").read_text())
    held = _relative(out / "digits" / "data" / "heldout")
    assert run["plan"]["folder"] == str((out / "digits" / "data" / "images").resolve())
    assert run["plan"]["pretrain_epochs"] == 15 and run["plan"]["heldout_fraction"] == zoo.ZOO_HELDOUT_FRACTION
    assert row["heldout"] == run["plan"]["n_heldout"] == len(held), "fit's held-out split is the zoo's"
    assert row["train"] == run["plan"]["n_train"] == 1797 - len(held), row
    assert row["cal_acc"] == run["stages"]["evaluate"]["heldout"]["CDC-Cal"]["acc"], "read from fit's run.json"
    assert row["cal_acc"] >= 0.6 and row["cal_ece"] <= 0.2, row
    assert row["near_auroc"] >= 0.9 and row["far_auroc"] >= 0.95 and row["flagged_ood"] <= 0.15, row
    assert 0.7 <= row["kmeans_pixels"] <= 0.88 and 0.3 <= row["kmeans_features"] <= 1, row
    # fit's default --input-filter auto: the shortcut check is silent on digits, so no second try.
    assert run["plan"]["input_filter"] == "auto" and run["input_filter"]["chosen"] == row["input_filter"] == "none", row
    assert not (out / "digits" / "fit" / "pretrain-none").exists()
    # A second call reuses the finished set; other settings are refused, not mixed in.
    assert main(argv) == 0 and json.loads((out / "zoo.json").read_text())[0] == row
    capsys.readouterr()
    assert main([a for a in argv if a != "--fast"]) != 0
    assert "other settings" in capsys.readouterr().err
