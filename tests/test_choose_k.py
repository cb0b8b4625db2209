"""--clusters auto (calibclust.cluster.choose_k): synthetic data with a known K, a folder without
structure, argument validation, and the choice saved with a trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from calibclust.cluster.choose_k import CRITERIA, choose_k, parse_clusters, parse_k_range
from calibclust.errors import InputError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _blobs(k: int, seed: int, n: int = 300, d: int = 8, std=1.0):
    x, y = make_blobs(n, d, centers=k, cluster_std=std, center_box=(-10, 10), random_state=seed)
    return x.astype(np.float32), y


@pytest.mark.parametrize("k", [3, 5, 8])
def test_isotropic_blobs_give_their_k(k):
    x, _ = _blobs(k, seed=k)
    choice = choose_k(x, (2, 12))
    assert choice.k == k, choice.format_table()
    assert set(choice.picks) == set(CRITERIA) and choice.message is None
    assert choice.ks == list(range(2, 13)) and all(len(v) == len(choice.ks) for v in choice.curves.values())
    assert choice.runner_up != choice.k and choice.runner_up in choice.ks


def test_eigengap_decides_and_counts_well_separated_groups():
    """The chosen K is the eigengap's pick (module docstring: measured on the data zoo); the Laplacian
    of a graph of m well-apart groups has m eigenvalues near 0 and then a jump."""
    from calibclust.cluster.choose_k import graph_neighbours, laplacian_spectrum

    x, _ = _blobs(6, seed=6, n=360)
    eigenvalues = laplacian_spectrum(x, 9, graph_neighbours(len(x)))
    assert np.all(np.diff(eigenvalues) >= -1e-9) and eigenvalues[5] < 0.01 < eigenvalues[6], eigenvalues
    assert graph_neighbours(300) == 20 and graph_neighbours(1500) == 100
    choice = choose_k(x, (2, 12))
    assert choice.k == choice.picks["eigengap"] == 6 and choice.runner_up != 6
    assert int(np.argmax(choice.curves["eigengap"])) == choice.ks.index(6)


def test_more_groups_than_the_range_allows_is_said_and_duplicates_do_not_break_the_graph():
    x, _ = _blobs(8, seed=8, n=400, std=0.3)
    choice = choose_k(x, (2, 5))
    assert choice.k == 5 and "more than 5 well-separated groups" in choice.message, choice.format_table()
    doubled = np.concatenate([x, x])  # exact duplicates: each point's twin is a neighbour, never itself
    assert choose_k(doubled, (2, 12)).k == 8


def test_blobs_k_means_finds_hard_give_their_k():
    """Not k-means-friendly: very unequal spreads (0.5 / 1.5 / 3) and very unequal sizes (5:1)."""
    x, _ = make_blobs(450, 8, centers=3, cluster_std=[0.5, 1.5, 3.0], center_box=(-12, 12), random_state=1)
    choice = choose_k(x.astype(np.float32), (2, 12))
    assert choice.k == 3, choice.format_table()
    x, y = make_blobs([250, 250, 50, 50], 8, cluster_std=1.0, center_box=(-10, 10), random_state=3)
    choice = choose_k(x.astype(np.float32), (2, 12))
    assert choice.k == 4, choice.format_table()


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_one_visual_class_says_no_structure_was_found(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) if kind == "gaussian" else rng.uniform(size=(300, 12))
    choice = choose_k(x, (2, 12))
    assert choice.message and "no cluster structure" in choice.message, choice.format_table()
    assert choice.gap_one[0] >= choice.curves["gap"][0] - choice.gap_sd[0]  # Gap(1) ≥ Gap(2) − s_2
    for k in (3, 5):  # and never on data with clusters
        assert choose_k(_blobs(k, seed=k)[0], (2, 12)).message is None


def test_choice_is_deterministic_and_json_ready():
    x, _ = _blobs(4, seed=4, n=200)
    a, b = choose_k(x, (2, 8), seed=3), choose_k(x, (2, 8), seed=3)
    assert a.curves == b.curves and a.k == b.k
    d = json.loads(json.dumps(a.to_dict()))
    assert d["k"] == a.k and d["k_range"] == [2, 8] and set(d["curves"]) == set(CRITERIA)


def test_too_few_points_and_bad_features_are_clear_errors():
    with pytest.raises(InputError, match="too few"):
        choose_k(np.random.default_rng(0).normal(size=(5, 4)), (2, 30))
    with pytest.raises(InputError, match="NaN"):
        choose_k(np.full((50, 3), np.nan), (2, 5))
    with pytest.raises(InputError, match="2-D"):
        choose_k(np.zeros(50), (2, 5))
    with pytest.raises(InputError, match="distinct feature vector"):  # a collapsed backbone
        choose_k(np.ones((300, 8)), (2, 5))
    # The range shrinks to what the points support (N // 3) instead of failing.
    assert choose_k(_blobs(3, seed=0, n=30)[0], (2, 30)).ks[-1] == 10


@pytest.mark.parametrize("text, message", [
    ("2-", "LOW..HIGH"), ("ten..20", "LOW..HIGH"), ("1..10", "at least 2"), ("8..8", "larger than LOW"),
    ("20..5", "larger than LOW"), ("2..5000", "above 1000"),
])
def test_k_range_validation(text, message):
    with pytest.raises(InputError, match=message):
        parse_k_range(text)


def test_k_range_and_clusters_parsing():
    assert parse_k_range("2..30") == (2, 30) and parse_k_range(" 3 - 9 ") == (3, 9) and parse_k_range("4:6") == (4, 6)
    assert parse_clusters("auto") == "auto" and parse_clusters("AUTO") == "auto" and parse_clusters("7") == 7
    for bad in ("1", "0", "x", "2.5"):
        with pytest.raises(InputError):
            parse_clusters(bad)


@pytest.mark.parametrize("argv, message", [
    (["--clusters", "1"], "--clusters must be at least 2"),
    (["--clusters", "many"], "integer ≥ 2 or 'auto'"),
    (["--clusters", "auto", "--k-range", "9..3"], "HIGH must be larger than LOW"),
])
@pytest.mark.parametrize("command", [["train", "cdc"], ["fit"]])
def test_cli_rejects_bad_clusters_and_k_range_before_any_work(command, argv, message, tmp_path, capsys):
    from calibclust.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*command, str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["train", "compare"], ["train", "cdc-ablation"]])
def test_commands_that_score_a_fixed_k_refuse_auto(command, tmp_path, capsys):
    from calibclust.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*command, str(tmp_path), "--out", str(tmp_path / "o"), "--clusters", "auto"])
    assert exc.value.code == 2 and "--clusters: invalid int value: 'auto'" in capsys.readouterr().err


def test_auto_needs_a_pretrained_backbone(digits_folder, tmp_path, capsys):
    from calibclust.cli import main

    rc = main(["train", "cdc", str(digits_folder), "--out", str(tmp_path / "o"), "--clusters", "auto", "--no-progress"])
    assert rc == 2 and "--clusters auto needs --backbone-weights" in capsys.readouterr().err


def test_train_cdc_auto_saves_the_choice_in_run_json_and_model(digits_folder, digits_moco_backbone, tmp_path, capsys):
    """200 digits with the quick start's MoCo backbone: K chosen in 2..8, trained with, and stored in
    run.json and the model's metadata (what `label` shows in its report); --resume keeps that K."""
    from calibclust.cli import main

    out = tmp_path / "cdc"
    argv = ["train", "cdc", str(digits_folder), "--out", str(out), "--clusters", "auto", "--k-range", "2..8",
            "--backbone-weights", str(digits_moco_backbone), "--freeze-backbone", "--views", "2",
            "--batch-size", "100", "--sub-batch-size", "50", "--orth-steps", "20", "--hidden-dim", "64", "--no-flip",
            "--no-progress"]
    assert main([*argv, "--epochs", "1"]) == 0
    run = json.loads((out / "run.json").read_text())
    choice = run["clusters_choice"]
    assert 2 <= choice["k"] <= 8 and run["config"]["num_clusters"] == choice["k"]
    assert choice["ks"] == list(range(2, 9)) and choice["n_points"] == 200
    meta = json.loads((out / "model" / "config.json").read_text())["metadata"]
    assert meta["num_clusters"] == choice["k"] and meta["train_stats"]["clusters_choice"]["k"] == choice["k"]
    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    assert f"resuming with K = {choice['k']}" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["clusters_choice"] == choice


def test_train_spice_auto_saves_the_choice(digits_folder, digits_moco_backbone, tmp_path):
    from calibclust.cli import main

    out = tmp_path / "spice"
    rc = main(["train", "spice", str(digits_folder), "--out", str(out), "--clusters", "auto", "--k-range", "2..6",
               "--backbone-weights", str(digits_moco_backbone), "--heads", "2", "--head-epochs", "2", "--views", "2",
               "--batch-size", "100", "--no-joint", "--no-flip", "--no-progress"])
    assert rc == 0
    choice = json.loads((out / "run.json").read_text())["clusters_choice"]
    meta = json.loads((out / "model" / "config.json").read_text())["metadata"]
    assert 2 <= choice["k"] <= 6 and meta["num_clusters"] == choice["k"]
    assert meta["train_stats"]["clusters_choice"] == choice
