"""``calibclust bench zoo``: what ``calibclust fit`` does on each data-zoo set, on images it never saw.

Per set (:mod:`calibclust.zoo`), in this process, through the functions the commands call:

1. **data**: the set's folder ``OUT/SET/data`` (``images/``, and ``train/`` / ``heldout/`` link
   trees of fit's own split of it, near- and far-OOD folders);
2. **fit**: :func:`calibclust.app.fitting.fit` on ``data/images`` into ``OUT/SET/fit`` with
   ``--pretrain-epochs`` from :class:`calibclust.zoo.ZooSettings` and held-out fraction
   :data:`calibclust.zoo.ZOO_HELDOUT_FRACTION`: its held-out split *is* the zoo's, so CDC-Cal and
   CDC-Clu ACC / NMI / ECE are read from its ``run.json``;
3. **label**: the exported model, through the torch-free labeller, labels the held-out images plus
   both OOD folders (``data/label-me``, OOD under ``_ood/near`` and ``_ood/far``): the share of
   held-out images it flags as OOD and the near- / far-OOD AUROC of its OOD score;
4. **baselines**: K-means on the held-out images' raw pixels and on fit's pretrained backbone's
   features of them, and the trained model's shortcut check (:mod:`calibclust.shortcut`).

A finished set (``OUT/SET/row.json``) is reused; an interrupted one continues where fit stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from calibclust.app.runs import continue_or_refuse, record_settings, truth_folder
from calibclust.bench import ZOO_SETS
from calibclust.errors import CalibclustError, InputError
from calibclust.io.files import write_json_atomic
from calibclust.train.profiles import FIGURES_HELDOUT_FRACTION as ZOO_HELDOUT_FRACTION  # = calibclust.zoo's

SETTINGS_FILE = "bench.json"

ZOO_COLUMNS = [
    ("set", "set"), ("train", "train"), ("heldout", "held-out"),
    ("cal_acc", "Cal ACC"), ("cal_nmi", "Cal NMI"), ("cal_ece", "Cal ECE"),
    ("clu_acc", "Clu ACC"), ("clu_nmi", "Clu NMI"), ("clu_ece", "Clu ECE"),
    ("flagged_ood", "held-out flagged OOD"), ("near_auroc", "near-OOD AUROC"), ("far_auroc", "far-OOD AUROC"),
    ("kmeans_pixels", "K-means pixels ACC"), ("kmeans_features", "K-means features ACC"),
    ("shortcut", "shortcut check"), ("input_filter", "input filter"), ("minutes", "minutes"),
]


def folder_pixels(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels in [0, 1] (flattened) and class indices of an ImageFolder, via the one decoder."""
    from calibclust.io.images import list_image_folder, load_images
    from calibclust.zoo import SIZE

    listing = list_image_folder(folder)
    images, errors = load_images(listing.paths, (SIZE, SIZE))
    if errors:
        raise InputError(f"{len(errors)} unreadable images in {folder}, e.g. {errors[0].path}: {errors[0].reason}")
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, listing.labels


def kmeans_acc(x: np.ndarray, y: np.ndarray, k: int, seed: int) -> float:
    from sklearn.cluster import KMeans

    from calibclust.metrics import hungarian_accuracy

    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return float(hungarian_accuracy(y, pred).accuracy)


def shortcut_cell(checkpoint: Path) -> str:
    """The trained model's shortcut check (:mod:`calibclust.shortcut`): its strongest statistic."""
    from calibclust.shortcut import SHORTCUT_THRESHOLD, stored_shortcut_check

    check = stored_shortcut_check(checkpoint)
    if not check or not check.get("strongest"):
        return "–"
    name = check["strongest"]
    fired = check["explained"][name] >= SHORTCUT_THRESHOLD  # today's threshold, also for rows stored earlier
    return f"{name} {check['explained'][name]:.2f}{' WARN' if fired else ''}"


def bench_one_set(name: str, out: Path, settings, seed: int = 0, verbose: bool = False) -> dict:
    """``calibclust fit`` on the set, its exported model labelling held-out + OOD images, and the
    baselines: one row of the zoo table (every figure on held-out images or the OOD folders);
    ``settings`` a :class:`calibclust.zoo.ZooSettings`."""
    from calibclust.app.fitting import fit, resolved_input_filter
    from calibclust.io.predictions import read_predictions
    from calibclust.metrics import auroc
    from calibclust.serve.labeler import Labeler
    from calibclust.zoo import ZOO, embed_heldout, make_zoo_set, read_heldout_features

    start = time.perf_counter()
    out = Path(out)
    done = out / "row.json"
    wanted = settings.record(seed)
    if done.is_file():  # a finished set: its figures stand (delete the folder to measure again)
        row = json.loads(done.read_text())
        if row.get("settings") != wanted:
            raise InputError(f"{out} holds this set measured with other settings ({row.get('settings')}); "
                             "delete it or choose another --out")
        return row
    resume = continue_or_refuse(out, SETTINGS_FILE, wanted, out / "fit", "data-zoo bench run")
    record_settings(out, SETTINGS_FILE, wanted)  # before the data, which depends on the seed too
    print(f"== {name}: {ZOO[name].description}" + (" (continuing)" if resume else ""), flush=True)
    paths = make_zoo_set(name, out / "data", seed=seed, n_ood=settings.n_ood)
    classes = json.loads((paths["root"] / "zoo.json").read_text())["classes"]
    fit_out = out / "fit"
    result = fit(paths["images"], fit_out, clusters=len(classes), resume=resume, pretrain_epochs=settings.pretrain_epochs,
                 heldout_fraction=ZOO_HELDOUT_FRACTION, seed=seed, progress=verbose, input_filter=settings.input_filter)
    heldout = result.run["stages"]["evaluate"]["heldout"]

    print("label: held-out images + near- and far-OOD with the exported model", flush=True)
    mixed = truth_folder(paths["root"] / "label-me", paths["heldout"], {"near": paths["near"], "far": paths["far"]})
    Labeler(result.model_path).label_folder(mixed, out / "label", overwrite=True, progress=verbose)
    table = read_predictions(out / "label" / "predictions.csv")
    path = np.asarray(table["path"], dtype=object)
    score = np.asarray(table["ood_score"], np.float64)
    kind = np.array([p.split("/")[1] if p.startswith("_ood/") else "in" for p in path])
    held = kind == "in"
    if int(held.sum()) != heldout["n"]:
        # The point of the zoo's split: fit's held-out figures and this table are about the same images.
        raise CalibclustError(f"fit held out {heldout['n']} images of {paths['images']}, the zoo's held-out folder has "
                              f"{int(held.sum())}: the two splits differ")
    flagged = float(np.mean(np.asarray(table["decision"], dtype=object)[held] == "ood"))

    def ood_auroc(which: str) -> float:
        other = kind == which
        return auroc(np.r_[score[held], score[other]], np.r_[np.zeros(held.sum()), np.ones(other.sum())])

    print("baselines: K-means on held-out pixels and on the pretrained backbone's features", flush=True)
    x, y = folder_pixels(paths["heldout"])
    embed_heldout(paths, fit_out / "pretrain", out / "heldout-features.npy", progress=verbose)
    features, y_feat = read_heldout_features(out / "heldout-features.npy", classes)
    cal, clu = heldout["CDC-Cal"], heldout["CDC-Clu"]
    row = {
        "set": name,
        "settings": wanted,
        "train": int(result.plan.n_train),
        "heldout": int(heldout["n"]),
        "cal_acc": cal["acc"], "cal_nmi": cal["nmi"], "cal_ece": cal["ece"],
        "clu_acc": clu["acc"], "clu_nmi": clu["nmi"], "clu_ece": clu["ece"],
        "flagged_ood": flagged,
        "near_auroc": ood_auroc("near"),
        "far_auroc": ood_auroc("far"),
        "kmeans_pixels": kmeans_acc(x, y, len(classes), seed),
        "kmeans_features": kmeans_acc(features, y_feat, len(classes), seed),
        "shortcut": shortcut_cell(result.checkpoint),
        # the one the kept model was pretrained with (fit --input-filter auto chooses)
        "input_filter": resolved_input_filter(result.run, result.plan),
        "minutes": (time.perf_counter() - start) / 60.0,
    }
    write_json_atomic(done, row)
    return row


def run_zoo_bench(args) -> int:
    """``calibclust bench zoo``."""
    from calibclust.bench import print_table
    from calibclust.zoo import bench_sets

    names, settings, out = bench_sets(args)
    rows = []
    for name in names:
        rows.append(bench_one_set(name, out / name, settings, args.seed, args.verbose))
        write_json_atomic(out / "zoo.json", rows)
    print(f"\ncalibclust bench zoo (calibclust fit --pretrain-epochs {settings.pretrain_epochs} --heldout-fraction "
          f"{ZOO_HELDOUT_FRACTION:g} --input-filter {settings.input_filter}, seed {args.seed}); every figure on fit's held-out split (never trained on) "
          "or the OOD folders:")
    print_table([h for _, h in ZOO_COLUMNS], [[r.get(k, "–") for k, _ in ZOO_COLUMNS] for r in rows])  # – : not in older rows
    return 0


ZOO_EPILOG = f"""\
sets: {", ".join(ZOO_SETS)} (what each varies: the calibclust.zoo docstring).
Per set: the data (one image folder, fit's train / held-out split of it, near- and far-OOD folders),
then calibclust fit on it (--pretrain-epochs 100, or 15 with --fast; --heldout-fraction
{ZOO_HELDOUT_FRACTION:g}), the exported model labelling held-out + OOD images, and K-means on raw pixels
and on the pretrained features of the held-out images. Finished sets are reused from --out.

examples:
  calibclust bench zoo --fast digits letters-fonts     # a few minutes each on 2 CPU cores
  calibclust bench zoo --out runs/zoo                  # every set, 100 pretraining epochs"""


def _zoo_options(p: argparse.ArgumentParser) -> None:
    from calibclust.bench import zoo_set_options

    zoo_set_options(p, "zoo-bench", "data, fit runs, labelled tables, zoo.json", fit_filters=True)


def register_cli(subparsers) -> None:
    """Adds ``bench zoo`` to core's ``bench`` group (registered before it in
    :data:`calibclust.cli.COMMANDS`): the bench runs ``fit``, which the core may not import."""
    from calibclust.bench import add_bench_target

    add_bench_target(
        subparsers,
        "zoo",
        help="runs fit on each data-zoo set; held-out ACC/NMI/ECE, OOD AUROC, K-means baselines",
        configure=_zoo_options,
        run=run_zoo_bench,
        epilog=ZOO_EPILOG,
    )
