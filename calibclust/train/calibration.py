"""How well CDC's confidence means accuracy off digits: ``calibclust bench calibration``.

For each data-zoo set (:mod:`calibclust.zoo`) the backbone is ``calibclust fit``'s MoCo-v2
pretraining (:mod:`calibclust.train.profiles`, ``ZooSettings.pretrain_epochs``) on the set's train
split, the split fit makes; every method is trained on the train split's frozen features and scored
on the held-out split (never trained on). Rows:

- **K-means**: DEC's Student-t soft assignment to K-means centres fitted on the train features;
- **SPICE_s**: SPICE stage 2 ("SPICE: Semantic Pseudo-Labeling for Image Clustering", §III-B) on
  the same cached views;
- **CDC-Clu / CDC-Cal** ("Towards Calibrated Deep Clustering Network") under each
  :data:`CDC_VARIANTS` setting: the paper's mini-cluster rule (K = B/2, L2-normalised features),
  its hard-data rule (K = B/25, Tab. 5 and appendix B.5) and the authors' L1 normalisation of the
  features the mini-cluster K-means runs on.

Next to every measured ECE the bench prints label-free estimates of it, each the binned gap between
the head's confidence and an agreement rate used in place of correctness
(:func:`estimated_ece`; the same 15 bins as the measured ECE):

- **seeds**: agreement, after Hungarian alignment, with the same method trained from another seed
  (disagreement between independently trained models estimates their error when the models are
  calibrated: Jiang et al., "Assessing Generalization of SGD via Disagreement", ICLR 2022);
- **kNN**: the share of an image's 10 nearest held-out neighbours (cosine, frozen features) that the
  head puts in the same cluster;
- **views**: agreement of the head's prediction on weak views of the image with its prediction on
  the image.

and for diagnosis, with the labels: the purity of the Eq. 1 mini-clusters (share of each
mini-cluster in its majority class, on batches of the train split) and Eq. 4's selected share and
pseudo-label accuracy in the last epoch. Labels never reach training; they only score.

What it measured (``--fast``, seed 0, held-out ECE of CDC-Cal vs CDC-Clu; before the zoo took fit's
split, on every fifth image per class, with the same CDC settings):

- the calibration head's confidence follows the clustering head's, because Eq. 1's targets are
  mini-cluster means of the clustering head's probabilities. On held-out digits both heads are
  *under*-confident (Cal 0.73 at ACC 0.78); on letters in many fonts and on reframed digits both are
  *over*-confident (Cal 0.65 at ACC 0.52; 0.49 at 0.31);
- the paper's easy-data rule K = B/2 gives mini-clusters of two images: 94–98 % pure on digits and
  letters, so the targets are hardly smoothed and CDC-Cal is no better calibrated than CDC-Clu off
  digits (0.155 vs 0.134 on letters, 0.183 vs 0.133 on reframed digits). The hard-data rule
  K = B/25 smooths more and puts CDC-Cal below CDC-Clu there (0.103, 0.102; emoji 0.295 vs 0.564)
  but hurts digits (0.171 vs 0.119): the rule of thumb holds, and which side a folder is on is not
  known without labels;
- L1 instead of L2 normalisation for the mini-cluster K-means changes ECE by at most 0.005;
- none of the three label-free estimates ranks the configurations by their measured ECE
  (Spearman's ρ 0.11 seeds, −0.51 kNN, −0.80 views over the 24 CDC rows of four sets): each
  agreement rate exceeds accuracy where clusters are consistently wrong, so a head that lowers its
  confidence towards the true accuracy looks worse to them. No check built on them is shipped.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from calibclust.metrics import calibration_error, clustering_report, hungarian_accuracy

# (row name, CDCConfig overrides)
CDC_VARIANTS: list[tuple[str, dict]] = [
    ("paper K=B/2", {}),
    ("hard K=B/25", {"difficulty": "hard"}),
    ("L1 mini-clusters", {"minicluster_norm": "l1"}),
]
NEIGHBOURS = 10
ESTIMATES = ("seeds", "kNN", "views")


def estimated_ece(confidence, agreement) -> float:
    """Binned |confidence − agreement|: the ECE formula with a label-free agreement rate in place of
    correctness (``calibration_error`` accepts fractional correctness)."""
    return calibration_error(np.asarray(confidence, np.float64), np.asarray(agreement, np.float64)).ece


def aligned_agreement(pred, reference) -> np.ndarray:
    """Per image 1.0 where ``reference``'s cluster, mapped one-to-one onto ``pred``'s clusters by the
    Hungarian algorithm, equals ``pred``'s; else 0.0."""
    pred, reference = np.asarray(pred), np.asarray(reference)
    return (hungarian_accuracy(pred, reference).map(reference) == pred).astype(np.float64)  # reference → pred


def knn_agreement(features: torch.Tensor, pred, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Per image, the share of its ``neighbours`` nearest others (cosine) that share its cluster."""
    z = F.normalize(features.float(), dim=1)
    k = min(neighbours, len(z) - 1)
    if k < 1:
        return np.ones(len(z))
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    nearest = sim.topk(k, dim=1).indices
    pred_t = torch.as_tensor(np.asarray(pred))
    return (pred_t[nearest] == pred_t[:, None]).double().mean(1).numpy()


def spearman(x, y) -> float:
    """Spearman's rank correlation (scipy), NaN for fewer than three pairs."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")  # a constant side has no ranking (scipy would warn and return NaN)
    return float(spearmanr(x, y).statistic)


def _scored(probs: torch.Tensor, labels: np.ndarray) -> dict:
    conf, pred = probs.max(1)
    pred, conf = pred.numpy(), conf.double().clamp(0, 1).numpy()
    report = clustering_report(labels, pred, conf)
    return {"acc": report.acc, "ece": report.calibration.ece, "confidence": float(conf.mean()), "pred": pred, "conf": conf}


def minicluster_purity(features: torch.Tensor, labels: np.ndarray, config, batches: int = 3, seed: int = 0) -> float:
    """Share of a batch's images that are in their mini-cluster's majority class (Eq. 1's
    mini-clusters, formed as the trainer forms them), averaged over ``batches`` random train batches
    (diagnosis only: it reads the labels)."""
    from calibclust.cluster.kmeans import kmeans
    from calibclust.train.cdc import minicluster_features

    g = torch.Generator().manual_seed(seed)
    batch = config.effective_batch_size(len(features))
    k = config.resolved_mini_clusters(batch)
    shares = []
    for b in range(batches):
        idx = torch.randperm(len(features), generator=g)[:batch]
        z = minicluster_features(features[idx], config.minicluster_norm)
        assign = kmeans(z, k, n_init=config.minicluster_restarts, max_iter=config.minicluster_iters, seed=seed + b).labels.numpy()
        y = labels[idx.numpy()]
        shares.append(sum(np.bincount(y[assign == c]).max() for c in np.unique(assign)) / len(idx))
    return float(np.mean(shares))


def _estimates(scored: dict, other_pred, knn: np.ndarray, views: np.ndarray) -> dict:
    return {
        "seeds": estimated_ece(scored["conf"], aligned_agreement(scored["pred"], other_pred)),
        "kNN": estimated_ece(scored["conf"], knn),
        "views": estimated_ece(scored["conf"], views),
    }


def _view_agreement(head_probs, weak: torch.Tensor, pred) -> np.ndarray:
    votes = [head_probs(weak[v]).argmax(1).numpy() == pred for v in range(weak.shape[0])]
    return np.mean(votes, axis=0).astype(np.float64)


def base_cdc_config(clusters: int, n_train: int, seed: int = 0, overrides: dict | None = None):
    """The CDC settings every CDC row starts from: ``calibclust fit``'s CPU profile for ``n_train``
    images (:func:`calibclust.train.profiles.cdc_config`) with the BatchNorm statistics left as
    pretraining made them (every row then scores the same frozen features), then ``overrides``."""
    from calibclust.train.profiles import cdc_config

    return dataclasses.replace(cdc_config(clusters, n_train, seed=seed), recalibrate_bn="no", **(overrides or {}))


def calibration_rows(train, held, backbone, info: dict, seed: int = 0, log=print,
                     cdc_overrides: dict | None = None, spice_overrides: dict | None = None) -> list[dict]:
    """Every row of the bench for one set: ``train`` / ``held`` are labelled
    :class:`~calibclust.train.data.TrainingData` and ``backbone`` the set's pretrained backbone. CDC
    trains with ``calibclust fit``'s CPU profile (:func:`base_cdc_config`); ``cdc_overrides`` /
    ``spice_overrides`` change settings on top of it (tests: a small H, few epochs)."""
    from calibclust.cluster.kmeans import kmeans
    from calibclust.models.clustering import PrototypeHead
    from calibclust.train.cdc import CDCTrainer, build_cdc_model, prototype_init
    from calibclust.train.data import head_probabilities
    from calibclust.train.features import compute_feature_cache, derive_seed
    from calibclust.train.spice import SpiceConfig, train_heads

    C = len(train.class_names)
    y = held.labels
    base = base_cdc_config(C, train.num_images, seed, cdc_overrides)
    quiet = lambda msg: None  # noqa: E731
    model = build_cdc_model(base, backbone, info.get("mean"), info.get("std")).eval()
    cache = compute_feature_cache(model.embed, model.preprocess, train.images, base.num_views, base.seed, base.views,
                                  base.eval_batch_size, "cpu", progress=False)
    held_views = compute_feature_cache(model.embed, model.preprocess, held.images, 4, derive_seed(seed, "held-out views"),
                                       base.views, base.eval_batch_size, "cpu", progress=False)
    z_held = held_views.plain
    rows = []

    def row(method, scored, seconds, **extra):
        rows.append({"method": method, "acc": scored["acc"], "ece": scored["ece"], "confidence": scored["confidence"],
                     "seconds": seconds, **extra})
        log(f"  {method}: ACC {scored['acc']:.3f} ECE {scored['ece']:.3f} confidence {scored['confidence']:.3f}")

    t0 = time.perf_counter()
    z_train = F.normalize(cache.plain.float(), dim=1)
    km = kmeans(z_train, C, n_init=10, seed=derive_seed(seed, "kmeans-baseline") & 0x7FFFFFFF)
    with torch.no_grad():
        km_probs = torch.softmax(PrototypeHead.from_centers(km.centers)(z_held.float()), 1)
    row("K-means (Student-t)", _scored(km_probs, y), time.perf_counter() - t0)

    t0 = time.perf_counter()
    spice = train_heads(cache.plain, cache.strong,
                        SpiceConfig(num_clusters=C, seed=seed, hidden_dim=base.hidden_dim, **(spice_overrides or {})))
    head = spice.best_head.eval()
    with torch.no_grad():
        row("SPICE_s", _scored(F.softmax(head(z_held.float()), 1), y), time.perf_counter() - t0)

    states = {}
    for name, overrides in CDC_VARIANTS:
        runs = []
        for run_seed in (seed, seed + 1):  # the second seed gives the cross-seed estimate
            cfg = dataclasses.replace(base, seed=run_seed, **overrides)
            t0 = time.perf_counter()
            if run_seed not in states:
                states[run_seed] = prototype_init(cache.plain, cfg.hidden_dim, C, run_seed, cfg.init_kmeans_restarts,
                                                  cfg.orth_steps, cfg.orth_scale, cfg.orth_lr)
            trainer = CDCTrainer(cfg, train, None, backbone, info, device="cpu", progress=False, feature_cache=cache,
                                 prototype_state=states[run_seed], log=quiet)
            result = trainer.fit()
            last = result.history[-1].get("selected", {})
            probs = {h: head_probabilities(result.model, z_held, h) for h in ("clustering", "calibration")}
            runs.append({"result": result, "scored": {h: _scored(p, y) for h, p in probs.items()},
                         "seconds": time.perf_counter() - t0, "selected": last})
        purity = minicluster_purity(cache.plain, train.labels, dataclasses.replace(base, **overrides), seed=seed)
        for h, short in (("clustering", "CDC-Clu"), ("calibration", "CDC-Cal")):
            main, other = runs[0], runs[1]
            scored = main["scored"][h]
            knn = knn_agreement(z_held, scored["pred"])
            views = _view_agreement(lambda z: head_probabilities(main["result"].model, z, h), held_views.weak, scored["pred"])
            row(f"{short} ({name})", scored, main["seconds"] + other["seconds"],
                estimates=_estimates(scored, other["scored"][h]["pred"], knn, views),
                second_seed={"acc": other["scored"][h]["acc"], "ece": other["scored"][h]["ece"]},
                purity=purity, selected_share=main["selected"].get("share"),
                selected_accuracy=main["selected"].get("accuracy"),
                mini_clusters=main["result"].config.resolved_mini_clusters(base.effective_batch_size(train.num_images)))
    return rows


COLUMNS = [("set", "set"), ("method", "method"), ("acc", "ACC"), ("ece", "ECE"), ("confidence", "mean conf"),
           ("est_seeds", "est. ECE seeds"), ("est_kNN", "est. ECE kNN"), ("est_views", "est. ECE views"),
           ("purity", "mini-cluster purity"), ("selected_share", "Eq. 4 share"), ("selected_accuracy", "Eq. 4 acc"),
           ("seconds", "seconds")]


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        est = r.get("estimates") or {}
        flat = {**r, **{f"est_{k}": v for k, v in est.items()}}
        out.append([flat.get(key, "–") if flat.get(key) is not None else "–" for key, _ in COLUMNS])
    return out


def estimate_rank_correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman's ρ between each label-free estimate and the measured ECE over every CDC row."""
    scored = [r for r in rows if r.get("estimates")]
    measured = [r["ece"] for r in scored]
    return {name: spearman([r["estimates"][name] for r in scored], measured) for name in ESTIMATES}


def run_calibration_bench(args) -> int:
    """``calibclust bench calibration`` (options in :mod:`calibclust.bench`)."""
    from calibclust.bench import print_table
    from calibclust.train.data import TrainingData, load_backbone_dir
    from calibclust.zoo import SIZE, ZOO_HELDOUT_FRACTION, bench_sets, heldout_features

    torch.manual_seed(args.seed)
    names, settings, out = bench_sets(args)
    wanted = settings.record(args.seed)
    rows = []
    for name in names:
        folder = out / name
        done = folder / "calibration.json"
        finished = json.loads(done.read_text()) if done.is_file() else {}
        if finished.get("settings") == wanted:
            rows += finished["rows"]  # a finished set's figures stand
            continue
        heldout_features(name, folder, settings, args.seed, args.verbose)  # pretrains once per set
        data = folder / "data"
        train = TrainingData.from_folder(data / "train", SIZE, progress=False)
        held = TrainingData.from_folder(data / "heldout", SIZE, progress=False)
        backbone, info = load_backbone_dir(folder / "pretrain")
        print(f"== {name}: {train.num_images} train / {held.num_images} held-out images", flush=True)
        set_rows = [{"set": name, **r} for r in calibration_rows(train, held, backbone, info, args.seed)]
        done.write_text(json.dumps({"settings": wanted, "rows": set_rows}, indent=2))
        rows += set_rows
    (out / "calibration.json").write_text(json.dumps(rows, indent=2))
    print(f"\ncalibclust bench calibration (fit's CPU profile, {settings.pretrain_epochs} pretraining epochs, seed {args.seed}); "
          f"ACC, ECE and the estimates on the held-out split ({ZOO_HELDOUT_FRACTION:.0%} of each set by fit's path-hash rule, "
          "never trained on); purity and Eq. 4 on the train split, with its labels (diagnosis only):")
    print_table([h for _, h in COLUMNS], table_rows(rows))
    rho = estimate_rank_correlations(rows)
    print("Spearman's rho, label-free estimate vs measured ECE over the CDC rows: "
          + ", ".join(f"{k} {v:.2f}" for k, v in rho.items()))
    return 0
