"""``calibclust fit`` and the Python API on a folder as users have them: JPEGs of mixed sizes and
aspect ratios in nested sub-folders, with a few unreadable files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import calibclust
from calibclust.app import fitting as fit_module
from calibclust.datasets import make_mixed_size_folder

CLASSES = 3


@pytest.fixture(scope="module")
def mixed_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    train = make_mixed_size_folder(root / "train", classes=CLASSES, per_class=45, seed=0)
    new = make_mixed_size_folder(root / "new", classes=CLASSES, per_class=10, seed=1, bad_files=0)
    return train, new


@pytest.fixture(scope="module")
def cli_run(mixed_folders, tmp_path_factory):
    """``calibclust fit`` with only --out and --clusters (plus a small budget, so CI stays short)."""
    train, _ = mixed_folders
    out = tmp_path_factory.mktemp("fit") / "run"
    proc = subprocess.run([sys.executable, "-m", "calibclust", "fit", str(train), "--out", str(out), "--clusters",
                           str(CLASSES), "--budget", "0.5", "--no-progress"], capture_output=True, text=True, timeout=900)
    return proc, out


def test_fit_cli_on_mixed_size_jpegs_writes_a_model_that_labels_a_new_folder(cli_run, mixed_folders, tmp_path):
    proc, out = cli_run
    # 3 unreadable files: the run finishes, and says so with exit code 3 (ARCHITECTURE: some inputs failed).
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Aspect ratios from 0.6 to 1.6: the plan crops the centre (the measured best of the three policies).
    assert "plan for" in proc.stdout and "held out" in proc.stdout and "resize: center-crop" in proc.stdout, proc.stdout
    assert "skipped 3 unreadable" in proc.stderr
    for name in ("model.onnx", "model-base.onnx", "report.html", "run.json", "commands.sh"):
        assert (out / name).is_file(), name
    # training read the images from the on-disk cache (every listed file has a row, bad ones too)
    assert sum(f.stat().st_size for f in (out / "cache").glob("images-*.u8")) == (3 * 45 + 3) * 32 * 32 * 3
    run = json.loads((out / "run.json").read_text())
    plan = run["plan"]
    assert plan["resize"] == "center-crop" and "--resize center-crop" in (out / "commands.sh").read_text()
    assert plan["n_images"] == 3 * 45 and plan["n_unreadable"] == 3 and len(run["unreadable"]) == 3
    assert plan["n_heldout"] + plan["n_train"] == plan["n_images"] and 3 <= plan["n_heldout"] <= 30, plan
    # The pretraining is sized to the budget: as many epochs as the measured cost per image allows.
    assert fit_module.MIN_PRETRAIN_EPOCHS < plan["pretrain_epochs"] <= fit_module.MAX_PRETRAIN_EPOCHS, plan
    assert plan["estimated_minutes"] <= plan["budget_minutes"] + 1e-9, plan
    assert set(run["stages"]) == set(fit_module.STAGES)
    # The canvases' dark colours vary per image, and the first model's clusters followed them: fit
    # (--input-filter auto, the default) pretrained and trained again on gradient magnitudes.
    choice = run["input_filter"]
    assert choice["chosen"] == "gradient" and choice["shortcut_check"]["strongest"] == "mean colour", choice
    assert "input filter (auto): the clusters follow mean colour" in proc.stdout, proc.stdout
    assert (out / "pretrain-none").is_dir() and (out / "cdc-none" / "model").is_dir(), "the first try is kept"
    assert json.loads((out / "pretrain" / "backbone.json").read_text())["spec"]["name"] == "gradient-input"
    held = run["stages"]["evaluate"]["heldout"]
    assert held["n"] == plan["n_heldout"]
    assert held["onnx_torch_label_agreement"] >= 0.99, held
    # Three clearly different digits: even 5 MoCo epochs must beat chance (1/3) on unseen images.
    assert held["CDC-Cal"]["acc"] > 0.45, held
    assert 0 <= held["CDC-Cal"]["ece"] <= 1
    commands = (out / "commands.sh").read_text()
    assert "calibclust fit" in commands and "--clusters 3" in commands and "calibclust label" in commands
    assert "--input-filter auto" in commands, "the run repeats with its own filter policy"
    report = (out / "report.html").read_text()
    assert "Held-out split" in report and "CDC-Cal" in report and "reliability" in report
    # The exported model labels a second folder of the same kind (torch-free command).
    _, new = mixed_folders
    labelled = tmp_path / "labelled"
    proc = subprocess.run([sys.executable, "-m", "calibclust", "label", str(new), "--model", str(out / "model.onnx"),
                           "--out", str(labelled), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((labelled / "summary.json").read_text())
    assert summary["files"] == 3 * 10 and summary["counts"]["error"] == 0


def test_fit_refuses_an_existing_run_and_bad_settings(cli_run, mixed_folders, tmp_path):
    _, out = cli_run
    train, _ = mixed_folders
    with pytest.raises(calibclust.InputError, match="--resume"):
        fit_module.fit(train, out, CLASSES)
    with pytest.raises(calibclust.InputError, match="nothing to resume"):
        fit_module.fit(train, tmp_path / "new", CLASSES, resume=True)
    with pytest.raises(calibclust.InputError, match="training images for 200 clusters"):
        fit_module.fit(train, tmp_path / "few", 200)
    assert not (tmp_path / "few").exists(), "a refused run leaves nothing that blocks the next try"
    with pytest.raises(calibclust.InputError) as err:
        fit_module.fit(tmp_path / "missing", tmp_path / "x", 1, budget_minutes=0, heldout_fraction=0.7)
    message = str(err.value)  # every problem at once
    assert "not a folder" in message and "clusters" in message and "budget" in message and "held-out" in message
    with pytest.raises(calibclust.InputError, match="--input-filter applies to the pretraining; --backbone-weights brings its own"):
        fit_module.fit(train, tmp_path / "y", CLASSES, backbone_weights=str(out / "pretrain"), input_filter="gradient")
    with pytest.raises(calibclust.InputError, match="input filter must be one of auto, none, gradient, got 'sobel'"):
        fit_module.fit(train, tmp_path / "y", CLASSES, input_filter="sobel")
    # The filter is part of the plan: the run's commands.sh repeats it, the plan names it.
    plan = fit_module.FitPlan(**{**json.loads((out / "run.json").read_text())["plan"], "input_filter": "gradient"})
    argv = fit_module.fit_command(plan, out)
    assert argv[argv.index("--input-filter") + 1] == "gradient" and "input filter gradient" in plan.describe(), (argv, plan.describe())


def test_heldout_split_is_stable_and_about_the_fraction():
    paths = [f"class{i % 7}/img{i}.jpg" for i in range(5000)]
    mask = fit_module.heldout_by_path_hash(paths, 0.1)
    assert 0.085 < mask.mean() < 0.115, mask.mean()
    shuffled = list(reversed(paths))
    again = dict(zip(shuffled, fit_module.heldout_by_path_hash(shuffled, 0.1)))
    assert all(again[p] == m for p, m in zip(paths, mask)), "the split does not depend on listing order"


def test_python_api_fit_predict_export_load(cli_run, mixed_folders, tmp_path, monkeypatch):
    """The README's Python example, and Ctrl-C in a late stage then ``resume=True``: finished stages
    are not run again."""
    _, first = cli_run
    train, new = mixed_folders
    out = tmp_path / "api"
    calls = {"export": 0, "train": 0}
    real_export, real_train = fit_module._export_stage, fit_module._train_stage

    def export_interrupted_once(*args, **kwargs):
        calls["export"] += 1
        if calls["export"] == 1:
            raise KeyboardInterrupt
        return real_export(*args, **kwargs)

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(fit_module, "_export_stage", export_interrupted_once)
    monkeypatch.setattr(fit_module, "_train_stage", counting_train)
    weights = str(first / "pretrain")
    with pytest.raises(KeyboardInterrupt):
        calibclust.fit(train, out=out, clusters=CLASSES, backbone_weights=weights, progress=False)
    assert json.loads((out / "run.json").read_text())["stages"].keys() == {"train"}
    trained = (out / "cdc" / "model" / "model.safetensors").stat().st_mtime_ns
    model = calibclust.fit(train, out=out, clusters=CLASSES, backbone_weights=weights, progress=False, resume=True)
    assert (out / "cdc" / "model" / "model.safetensors").stat().st_mtime_ns == trained, "CDC was not trained again"
    assert calls == {"export": 2, "train": 2}  # the train stage was entered, found done, and returned
    assert isinstance(model, calibclust.FittedModel) and model.heldout["n"] > 0

    images = np.zeros((4, 50, 70, 3), np.uint8)  # any size: resized like every image the model sees
    probs = model.predict_proba(images)
    assert probs.shape == (4, CLASSES) and np.allclose(probs.sum(1), 1, atol=1e-5)
    paths = sorted(new.rglob("*.jpg"))[:6]
    from_paths = model.predict_proba(paths)
    exported = model.export(tmp_path / "exported.onnx")
    assert exported.parity.passed, exported.parity.summary()
    labeller = calibclust.load(tmp_path / "exported.onnx")
    assert np.allclose(labeller.predict_proba(paths), from_paths, atol=1e-4), "ONNX and torch agree on the same files"
    result = labeller.label_folder(new, out=tmp_path / "labelled", target_accuracy=0.9)
    assert result.exit_code == 0 and result.summary["files"] == 3 * 10
    assert result.summary["thresholds"]["policy"] == "target_accuracy"


def test_fit_any_registered_method_kmeans(cli_run, mixed_folders, tmp_path):
    """``fit --method`` comes from the registry: the K-means baseline runs every stage and writes the
    same outputs, its held-out row named as the method reports it."""
    _, first = cli_run
    train, new = mixed_folders
    out = tmp_path / "kmeans"
    model = calibclust.fit(train, out=out, clusters=CLASSES, backbone_weights=str(first / "pretrain"), progress=False,
                           method="kmeans")
    held = model.heldout
    assert model.plan.method == "kmeans" and held["rows"] == ["K-means"] and "heads_agree" not in held, held
    assert 0 < held["K-means"]["acc"] <= 1 and held["onnx_torch_label_agreement"] >= 0.99, held
    assert (out / "kmeans" / "model" / "config.json").is_file() and "--method kmeans" in (out / "commands.sh").read_text()
    assert "K-means" in (out / "report.html").read_text()
    labeller = calibclust.load(out / "model.onnx")
    assert labeller.metadata.method == "kmeans" and not labeller.metadata.calibrated
    assert model.predict_proba(sorted(new.rglob("*.jpg"))[:3]).shape == (3, CLASSES)
    again = calibclust.fit(train, out=out, clusters=CLASSES, resume=True)  # the run's own method
    assert again.plan.method == "kmeans" and again.heldout == held
    # With --backbone-weights the filter is the weights' own: the default auto is no other setting.
    assert again.plan.input_filter == "none" and calibclust.fit(train, out=out, clusters=CLASSES, resume=True,
                                                                input_filter="auto").heldout == held
    with pytest.raises(calibclust.InputError, match="method: the run has kmeans, now cdc"):
        calibclust.fit(train, out=out, clusters=CLASSES, resume=True, method="cdc")
    with pytest.raises(calibclust.InputError, match=r"method must be one of kmeans, spice, cdc(, \w+)*, got 'dbscan'"):
        calibclust.fit(train, out=tmp_path / "x", clusters=CLASSES, method="dbscan")


@pytest.mark.parametrize("n, views", [(1_600, 8), (20_000, 4), (100_000, 1)])
def test_plan_caches_fewer_views_per_image_for_large_folders(n, views):
    """CDC's cached view features are 2 × views × images × D floats: above 10,000 images fewer views
    per image keep them at ~80,000 of each kind, so memory stays bounded as the folder grows."""
    from types import SimpleNamespace

    data = SimpleNamespace(paths=[f"{i}.png" for i in range(n)], unreadable=[], labels=None, class_names=[],
                           resize="squash")
    sizes = {"median_width": 32, "median_height": 32, "min_width": 32, "max_width": 32, "min_aspect": 1.0, "max_aspect": 1.0}
    plan = fit_module.make_plan("f", data, sizes, np.zeros(n, bool), 10, 10.0, "cpu", None, 0.1, 0)
    assert plan.cdc_views == views and f"{views} cached views per image" in plan.describe()


def _fake_trained_run(out, explained: dict):
    """A fit folder after its first pretraining and training, with the shortcut check CDC stored."""
    from calibclust.shortcut import ShortcutCheck

    for name in ("pretrain", "cdc/model"):
        (out / name).mkdir(parents=True)
    check = ShortcutCheck(explained, n_images=100).to_dict()
    (out / "cdc" / "model" / "config.json").write_text(json.dumps({"metadata": {"train_stats": {"shortcut_check": check}}}))
    run = fit_module.FitRun(out)
    run.record["stages"] = {"pretrain": {"seconds": 1.0}, "train": {"seconds": 2.0}}
    run.save()
    return run


def test_input_filter_auto_pretrains_again_on_gradients_only_when_the_clusters_follow_colour(tmp_path):
    """``--input-filter auto``: the label-free shortcut check of the first model decides; the first
    try is set aside (not lost), run.json says why, and the choice is taken once."""
    from types import SimpleNamespace

    plan = SimpleNamespace(input_filter="auto", backbone_weights=None, method="cdc", seed=0)
    run = _fake_trained_run(tmp_path / "colour", {"mean colour": 0.68, "foreground area": 0.1})
    run.record["clusters_choice"] = {"k": 7, "seconds": 3.0}  # --clusters auto on the colours' backbone
    assert fit_module._choose_input_filter(run, plan, None, tmp_path / "colour" / "cdc" / "model") == "gradient"
    assert not run.done("pretrain") and not run.done("train"), "both stages run again"
    assert (tmp_path / "colour" / "pretrain-none").is_dir() and (tmp_path / "colour" / "cdc-none" / "model").is_dir()
    assert not (tmp_path / "colour" / "pretrain").exists()
    saved = json.loads((tmp_path / "colour" / "run.json").read_text())["input_filter"]
    assert saved["chosen"] == "gradient" and saved["shortcut_check"]["strongest"] == "mean colour"
    assert set(saved["first_try_stages"]) == {"pretrain", "train"}
    # K is chosen again on the gradients' backbone; the first choice stays on record, and in the minutes.
    assert "clusters_choice" not in run.record and saved["first_try_clusters_choice"]["k"] == 7
    assert fit_module.clusters_choices(run.record) == [{"k": 7, "seconds": 3.0}]
    assert fit_module.resolved_input_filter(run.record, plan) == "gradient"
    assert saved["first_try_stages"]["train"]["model_dir"] == str(tmp_path / "colour" / "cdc-none" / "model")
    # Taken once: the second try's own check does not start a third.
    (tmp_path / "colour" / "pretrain").mkdir()
    assert fit_module._choose_input_filter(run, plan, None, tmp_path / "nowhere") == "gradient"
    assert (tmp_path / "colour" / "pretrain").is_dir(), "the second try is not set aside"

    for name, explained in (("shape", {"mean colour": 0.05, "foreground area": 0.22}),
                            ("size", {"mean colour": 0.05, "foreground area": 0.6})):  # not what gradients remove
        run = _fake_trained_run(tmp_path / name, explained)
        assert fit_module._choose_input_filter(run, plan, None, tmp_path / name / "cdc" / "model") == "none", name
        assert run.done("train") and (tmp_path / name / "pretrain").is_dir()
        assert json.loads((tmp_path / name / "run.json").read_text())["input_filter"]["chosen"] == "none"
    # A check that fails keeps the images and says why: it never costs the trained model.
    broken = _fake_trained_run(tmp_path / "broken", {})
    (tmp_path / "broken" / "cdc" / "model" / "config.json").write_text("{}")
    assert fit_module._choose_input_filter(broken, plan, None, tmp_path / "broken" / "cdc" / "model") == "none"
    assert "error" in broken.record["input_filter"]["shortcut_check"] and broken.done("train")
    fixed = SimpleNamespace(input_filter="none", backbone_weights=None, method="cdc", seed=0)
    assert fit_module._choose_input_filter(_fake_trained_run(tmp_path / "fixed", {"mean colour": 0.9}), fixed, None, None) == "none"


def test_fit_clusters_auto_chooses_k_once_trains_it_and_reports_it(digits_folder, digits_moco_backbone, tmp_path, capsys):
    """``fit --clusters auto`` (here from Python, with the K-means baseline to stay fast): K is chosen
    without labels after pretraining, trained with, stored in run.json, the model metadata (what
    ``label``'s report plots) and fit's report; commands.sh repeats it; --resume keeps it."""
    out = tmp_path / "auto"
    model = calibclust.fit(digits_folder, out=out, clusters="auto", k_range=(2, 8), backbone_weights=str(digits_moco_backbone),
                           method="kmeans", progress=False)
    choice = model.run["clusters_choice"]
    first = capsys.readouterr().out
    assert "--clusters auto: comparing K = 2..8" in first and f"K = {choice['k']} chosen without labels" in first
    assert 2 <= choice["k"] <= 8 and choice["ks"] == list(range(2, 9)) and choice["n_points"] == model.plan.n_train
    assert model.plan.clusters == "auto" and model.plan.k_range == [2, 8]
    labeller = calibclust.load(out / "model.onnx")
    assert labeller.num_clusters == choice["k"] and labeller.metadata.train_stats["clusters_choice"] == choice
    assert model.predict_proba(sorted(digits_folder.rglob("*.png"))[:2]).shape == (2, choice["k"])
    assert "How K was chosen" in (out / "report.html").read_text()
    assert "--clusters auto --k-range 2..8" in (out / "commands.sh").read_text()
    assert repr(model) == f"FittedModel({str(out)!r}, clusters={choice['k']})"
    assert model.run["minutes"] * 60 >= choice["seconds"], "the search counts in the run's minutes"

    again = calibclust.fit(digits_folder, out=out, clusters="auto", resume=True, progress=False)
    assert again.run["clusters_choice"] == choice and "comparing K" not in capsys.readouterr().out
    with pytest.raises(calibclust.InputError, match=r"K range: the run has \[2, 8\], now \[2, 5\]"):
        calibclust.fit(digits_folder, out=out, clusters="auto", k_range="2..5", resume=True)
    with pytest.raises(calibclust.InputError, match="clusters: the run has auto, now 4"):
        calibclust.fit(digits_folder, out=out, clusters=4, resume=True)
    from calibclust.cli import main  # the CLI's --k-range default is no other setting on resume

    assert main(["fit", str(digits_folder), "--out", str(out), "--clusters", "auto", "--resume", "--no-progress"]) == 0


def test_fit_clusters_auto_refuses_too_few_images_for_its_k_range_before_pretraining(tmp_path):
    """choose_k compares K with at least 3 images per cluster: checked when the images are read."""
    from calibclust.datasets import make_digits_folder

    folder = make_digits_folder(tmp_path / "digits", limit=30, seed=0)
    with pytest.raises(calibclust.InputError, match=r"training images for --k-range 10..30; fit needs at least 30"):
        calibclust.fit(folder, out=tmp_path / "a", clusters="auto", k_range="10..30")
    small = make_digits_folder(tmp_path / "small", limit=15, seed=0)
    with pytest.raises(calibclust.InputError, match=r"training images for --k-range 2..30; fit needs at least 20"):
        calibclust.fit(small, out=tmp_path / "b", clusters="auto")  # the default range
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("clusters, k_range, message", [
    (5, (2, 8), r"k_range \(--k-range\) applies to clusters='auto' only"),
    ("auto", (1, 8), "the lowest K must be at least 2"),
    ("auto", "8..3", "HIGH must be larger than LOW"),
    ("auto", 7, r"k_range must be \(LOW, HIGH\)"),
    ("many", None, "clusters must be an integer >= 2 or 'auto'"),
])
def test_fit_refuses_bad_clusters_and_k_range_before_reading_images(clusters, k_range, message, tmp_path):
    with pytest.raises(calibclust.InputError, match=message):
        calibclust.fit(tmp_path, out=tmp_path / "o", clusters=clusters, k_range=k_range)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("overcluster, method, message", [
    (1, "cdc", r"overcluster must be a factor in \(1, 5\], got 1"),
    (6, "cdc", r"overcluster must be a factor in \(1, 5\], got 6"),
    ("2", "cdc", r"overcluster must be a factor in \(1, 5\], got '2'"),
    (2, "kmeans", "--overcluster does not apply to kmeans"),
])
def test_fit_refuses_a_bad_overcluster_factor_before_reading_images(overcluster, method, message, tmp_path):
    with pytest.raises(calibclust.InputError, match=message):
        calibclust.fit(tmp_path, out=tmp_path / "o", clusters=4, overcluster=overcluster, method=method)
    assert not (tmp_path / "o").exists()


def test_fit_overcluster_trains_more_clusters_and_exports_k(digits_folder, digits_moco_backbone, tmp_path, capsys):
    """``fit --overcluster 2``: CDC trains 2K clusters, merged into K before export; run.json, the
    summary and commands.sh say so; the exported model has K clusters; --resume keeps the factor."""
    from calibclust.cli import main

    out = tmp_path / "over"
    assert main(["fit", str(digits_folder), "--out", str(out), "--clusters", "5", "--overcluster", "2",
                 "--backbone-weights", str(digits_moco_backbone), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    merged = run["stages"]["train"]["overcluster"]
    assert run["plan"]["overcluster"] == 2.0 and merged["trained_clusters"] == 10 and len(merged["groups"]) == 10
    assert sorted(set(merged["groups"])) == list(range(5))
    assert "merged 10 trained clusters into 5 by co-assignment" in printed
    assert "trained 10 clusters, merged into 5" in printed and "trained as 10 = ⌈2·5⌉" in printed
    labeller = calibclust.load(out / "model.onnx")
    assert labeller.num_clusters == 5 and labeller.metadata.train_stats["overcluster"]["groups"] == merged["groups"]
    assert "--overcluster 2" in (out / "commands.sh").read_text()
    assert "Trained with 10 clusters (--overcluster), merged into 5: cluster 0 = trained" in (out / "report.html").read_text()
    with pytest.raises(calibclust.InputError, match=r"overcluster: the run has 2.0, now 3.0"):
        calibclust.fit(digits_folder, out=out, clusters=5, overcluster=3, resume=True)
    again = calibclust.fit(digits_folder, out=out, clusters=5, resume=True, progress=False)  # the run's own factor
    assert again.run["stages"]["train"]["overcluster"] == merged and again.plan.overcluster == 2.0
    # --clusters auto: the trained count for the top of --k-range is checked when the images are read
    with pytest.raises(calibclust.InputError, match=r"--k-range 2..30 trained as up to 120 \(--overcluster 4\); fit needs "
                                                    r"at least 240"):
        calibclust.fit(digits_folder, out=tmp_path / "too-many", clusters="auto", overcluster=4)
    assert not (tmp_path / "too-many").exists()
