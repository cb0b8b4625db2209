"""``calibclust exemplars FOLDER --model MODEL``: add a cluster-exemplars sidecar to an exported model.

Scores every image of FOLDER with the model (the :class:`~calibclust.serve.labeler.Labeler`, so
the same decoder and graph as ``calibclust label``), keeps for each cluster the images with the
highest calibrated confidence among those not flagged out-of-distribution, and writes

* ``<new model>.exemplars.npz`` – their thumbnails (:mod:`calibclust.exemplars`), and
* a NEW model file (default ``<stem>-exemplars.onnx`` beside MODEL) whose metadata names the
  sidecar; MODEL itself is never modified.

``calibclust demo --model <new model>`` then shows the exemplars and lets a person name clusters.
Imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import sys

from calibclust.cli_names import add_model_arg

DESCRIPTION = """\
Pick each cluster's most typical images from FOLDER (highest calibrated confidence, excluding
images the model flags as out-of-distribution), store their thumbnails in a small sidecar file, and
write a NEW model file that points to it (MODEL itself is never modified). The demo shows these
thumbnails per cluster so that a person can name the clusters.

Use images the model was trained on (or any folder of the same kind of images); only the chosen
images are decoded a second time, so a large folder costs one labelling pass.
Exit codes: 0 ok, 3 done but some files were unreadable, 1 failure, 2 bad usage.
"""

EPILOG = """\
examples:
  calibclust exemplars train_images/ --model model.onnx         # writes model-exemplars.onnx + sidecar
  calibclust exemplars train_images/ --model model.onnx --out named/model.onnx --per-cluster 12
  calibclust demo --model model-exemplars.onnx
"""


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "exemplars",
        help="store each cluster's most typical images with a model (for the demo's gallery and naming)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(p, "exported model (.onnx)")
    p.add_argument("folder", metavar="FOLDER", help="images to pick exemplars from (searched recursively)")
    p.add_argument("--out", metavar="NEW_MODEL",
                   help="new model file (default: <MODEL stem>-exemplars.onnx beside MODEL, numbered if taken)")
    p.add_argument("--per-cluster", type=int, default=8, metavar="K", help="thumbnails per cluster (default 8)")
    p.add_argument("--thumbnail-size", type=int, metavar="PX",
                   help="longer side of the thumbnails (default: the model's input size, at most 96)")
    p.add_argument("--include-ood", action="store_true", help="also consider images flagged out-of-distribution")
    p.add_argument("--backend", default="auto", metavar="NAME", help="auto (default), cpu, cuda, tensorrt")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per inference batch (default: the backend's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def score_folder(labeler, folder, per_cluster: int, include_ood: bool = False, batch_size: int | None = None,
                 progress: bool = True):
    """Stream FOLDER through the model; keep the top ``per_cluster`` paths per cluster by confidence.

    Returns (TopPerCluster, number of files, unreadable errors).
    """
    import numpy as np
    from tqdm import tqdm

    from calibclust.exemplars import TopPerCluster
    from calibclust.io.images import ImageDecodeError, discover_images

    top = TopPerCluster(labeler.num_clusters, per_cluster)
    ood_t = labeler.metadata.ood.threshold
    batch_size = batch_size or labeler.batch_size
    errors: list[ImageDecodeError] = []
    n = 0
    bar = tqdm(desc="scoring", unit="img", disable=not progress)

    def flush(paths, arrays):
        out = labeler.predict(np.stack(arrays), ("confidence", "label", "ood_score"))
        eligible = None
        if not include_ood and ood_t is not None:
            eligible = ~(np.asarray(out["ood_score"], np.float64) > ood_t)
        top.add(paths, out["label"], out["confidence"], eligible)

    paths, arrays = [], []
    for path in discover_images(folder):
        n += 1
        bar.update(1)
        try:
            arrays.append(labeler.decode(path))
            paths.append(str(path))
        except ImageDecodeError as err:
            errors.append(err)
        if len(arrays) == batch_size:
            flush(paths, arrays)
            paths, arrays = [], []
    if arrays:
        flush(paths, arrays)
    bar.close()
    return top, n, errors


def run(args) -> int:
    from pathlib import Path

    from calibclust.errors import InputError
    from calibclust.exemplars import attach_exemplars, build_exemplars, thumbnail_size_for
    from calibclust.serve.labeler import Labeler

    if args.per_cluster < 1:
        raise InputError("--per-cluster must be >= 1")
    folder = Path(args.folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    labeler = Labeler(args.model, backend=args.backend)
    top, n, errors = score_folder(labeler, folder, args.per_cluster, args.include_ood, args.batch_size,
                                  progress=not args.no_progress)
    if n == 0:
        raise InputError(f"no images found under {folder}")
    paths, cluster, score = top.result()
    if not paths:
        raise InputError(f"none of the {n} images is usable as an exemplar (all unreadable or out-of-distribution; "
                         "--include-ood considers OOD images too)")
    size = thumbnail_size_for(labeler.input_size, args.thumbnail_size or 96)
    shown = []
    for p in paths:
        try:
            shown.append(Path(p).relative_to(folder).as_posix())
        except ValueError:
            shown.append(p)
    exemplars, late_errors = build_exemplars(
        paths, cluster, score, labeler.num_clusters, size, per_cluster=args.per_cluster,
        score_name="confidence", max_pixels=labeler.max_pixels, display_paths=shown,
        info={"source_folder": str(folder.resolve()), "weights_digest": labeler.metadata.weights_digest},
        resize=labeler.metadata.resize,
    )
    new_model, sidecar = attach_exemplars(args.model, exemplars, args.out)
    counts = exemplars.counts()
    empty = [labeler.cluster_names[c] for c in range(labeler.num_clusters) if counts[c] == 0]
    print(f"{n} images scored; {len(exemplars.cluster)} exemplars "
          f"({counts.min()}–{counts.max()} per cluster, {size[0]}×{size[1]} thumbnails)\n"
          f"sidecar:   {sidecar}\nnew model: {new_model}\n"
          f"try it:    calibclust demo --model {new_model}")
    if empty:
        print(f"no exemplar for {len(empty)} cluster(s): {', '.join(empty[:10])}"
              f"{' …' if len(empty) > 10 else ''} (no image of the folder was assigned to them)", file=sys.stderr)
    bad = len(errors) + len(late_errors)
    if bad:
        print(f"{bad} file(s) could not be read and were skipped, e.g. {errors[0] if errors else late_errors[0]}",
              file=sys.stderr)
        return 3
    return 0
