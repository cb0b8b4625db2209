"""The method interface and its registry (calibclust.train.methods): every method fits, predicts,
saves and loads the same way; K-means is a method like the others and exports like them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from calibclust.errors import InputError
from calibclust.train.methods import METHODS, ClusteringMethod, get_method, method_names
from model_fixtures import three_shapes

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _backbone(size: int = 16):
    from calibclust.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("small", input_size=size).eval()


def test_registry_lists_builtin_methods_and_names_unknown_ones():
    # Built-ins first, in registry order; methods added later go after the first three.
    assert list(METHODS)[:3] == ["kmeans", "spice", "cdc"] and method_names()[:len(METHODS)] == list(METHODS)
    assert {"dccm", "spc", "gcc"} <= set(METHODS)
    for name in METHODS:
        cls = get_method(name)
        assert issubclass(cls, ClusteringMethod) and cls.name == name
    with pytest.raises(InputError, match="unknown method 'dbscan'; available: kmeans, spice, cdc"):
        get_method("dbscan")


def test_registry_module_imports_no_torch():
    code = ("import sys; import calibclust.train.methods as m; m.method_names(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_kmeans_method_is_dec_soft_assignment_on_its_centres(tmp_path):
    """K-means's probabilities are DEC's Student-t q_k ∝ (1 + ‖ẑ − μ_k‖²)^-1 of the L2-normalised
    features, on images it never saw; saved and loaded back, it predicts the same."""
    from calibclust.metrics import hungarian_accuracy
    from calibclust.train.data import embed_images

    train, held = three_shapes(96, seed=0), three_shapes(48, seed=1)
    backbone = _backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = get_method("kmeans")(3, seed=0).fit(train, backbone, {"source": "test"})
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items()), "fit changed the given backbone"
    probs = method.predict_proba(held.images)
    assert probs.shape == (48, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)

    z = torch.nn.functional.normalize(embed_images(method.model, held.images), dim=1)
    centers = method.model.heads["clustering"].centers.detach()
    q = 1.0 / (1.0 + torch.cdist(z, centers) ** 2)
    np.testing.assert_allclose(probs, (q / q.sum(1, keepdim=True)).numpy(), atol=1e-5)
    acc = hungarian_accuracy(held.labels, probs.argmax(1)).accuracy
    assert acc >= 0.9, f"K-means on three distinct shapes, 48 held-out images: ACC {acc:.3f}"
    assert method.metadata.method == "kmeans" and not method.metadata.calibrated
    assert method.metadata.confidence_threshold == 0.0  # no default confidence cut on an uncalibrated soft assignment
    assert method.row_names() == ["K-means"] and method.seconds["K-means"] > 0

    method.save(tmp_path / "model")
    loaded = ClusteringMethod.load(tmp_path / "model")
    assert type(loaded).__name__ == "KMeansMethod"
    np.testing.assert_allclose(loaded.predict_proba(held.images), probs, atol=1e-6)


def test_kmeans_model_exports_to_onnx_and_labels_like_any_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from calibclust.export.onnx import export_onnx
    from calibclust.serve.labeler import Labeler

    train = three_shapes(96, seed=0)
    method = get_method("kmeans")(3, seed=0).fit(train, _backbone(), {"source": "test"})
    method.save(tmp_path / "model")
    exported = export_onnx(method.model, method.metadata, train.images, tmp_path / "kmeans.onnx", log=lambda *a: None)
    out = Labeler(str(exported.path)).predict_all(train.images[:20])
    np.testing.assert_allclose(out["probs"], method.predict_proba(train.images[:20]), atol=1e-4)


def test_fit_refuses_more_clusters_than_images_and_a_config_for_another_k():
    from calibclust.train.kmeans_method import KMeansConfig

    with pytest.raises(InputError, match="5 images cannot form 6 clusters"):
        get_method("kmeans")(6).fit(three_shapes(5), _backbone())
    with pytest.raises(InputError, match="config.num_clusters=4 but n_clusters=3"):
        get_method("kmeans")(3, KMeansConfig(num_clusters=4))
    with pytest.raises(InputError, match="not fitted"):
        get_method("kmeans")(3).predict_proba(three_shapes(6).images)


def test_cdc_and_spice_methods_report_their_rows_and_round_trip(tmp_path):
    from calibclust.train.cdc import CDCConfig
    from calibclust.train.spice import SpiceConfig

    train, held = three_shapes(96, seed=0), three_shapes(30, seed=1)
    backbone = _backbone()
    cdc = get_method("cdc")(3, CDCConfig(num_clusters=3, epochs=1, batch_size=48, sub_batch_size=24, hidden_dim=16,
                                         freeze_backbone=True, num_views=1, orth_steps=10, recalibrate_bn="no"))
    cdc.fit(train, backbone, {"source": "test"}, out_dir=tmp_path / "cdc")
    rows = cdc.predictions(held.images)
    assert list(rows) == ["CDC-Clu", "CDC-Cal"] and all(p.shape == (30, 3) for p in rows.values())
    np.testing.assert_allclose(rows["CDC-Cal"], cdc.predict_proba(held.images), atol=1e-6)  # §3.4: Cal predicts
    assert (tmp_path / "cdc" / "model" / "config.json").is_file()

    spice = get_method("spice")(3, SpiceConfig(num_clusters=3, n_heads=2, hidden_dim=16, batch_size=48, head_epochs=2,
                                               views=1, num_neighbors=5, joint_steps=2, labeled_batch=8,
                                               unlabeled_ratio=1))
    spice.fit(train, backbone, {"source": "test"})
    rows = spice.predictions(held.images)
    assert list(rows) == ["SPICE_s", "SPICE"] and spice.seconds["SPICE_s"] <= spice.seconds["SPICE"]
    spice.save(tmp_path / "spice")  # the API saves SPICE too, not only its CLI
    loaded = ClusteringMethod.load(tmp_path / "spice", device="auto")
    assert loaded.metadata.method == "spice" and loaded.device == "cpu" and loaded.config == spice.config
    np.testing.assert_allclose(loaded.predict_proba(held.images), rows["SPICE"], atol=1e-5)

    import dataclasses

    stage2_only = get_method("spice")(3, dataclasses.replace(spice.config, joint=False), device="auto")
    stage2_only.fit(train, backbone, {"source": "test"})
    assert list(stage2_only.predictions(held.images)) == ["SPICE_s"]
    stage2_only.save(tmp_path / "spice2")  # loaded with the settings it was trained with: still named SPICE_s
    assert list(ClusteringMethod.load(tmp_path / "spice2").predictions(held.images)) == ["SPICE_s"]


def test_every_registered_method_without_its_own_command_gets_train_name(digits_folder, tmp_path, capsys):
    """`calibclust train kmeans` comes from the registry alone (no command code in the method's module)."""
    import json

    from calibclust.cli import main

    rc = main(["train", "kmeans", str(digits_folder), "--clusters", "10", "--out", str(tmp_path / "km"),
               "--no-progress", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "on its training images ACC" in printed and "calibclust export onnx --model" in printed
    config = json.loads((tmp_path / "km" / "model" / "config.json").read_text())
    assert config["metadata"]["method"] == "kmeans" and config["architecture"]["head_kind"] == "prototype"


def test_compare_methods_option_names_registered_methods_only():
    from calibclust.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "compare", "f", "--out", "o", "--clusters", "3", "--methods", "cdc,kmeans"])
    assert args.methods == "cdc,kmeans"
    assert parser.parse_args(["train", "compare", "f", "--out", "o", "--clusters", "3"]).methods == ",".join(method_names())
    for bad in ("dbscan", "cdc,cdc", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "compare", "f", "--out", "o", "--clusters", "3", "--methods", bad])
