"""Labeler and backends: predictions equal an independent numpy computation; the contract is enforced."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import (  # noqa: E402
    colour_image,
    expected_probs,
    make_contract_model,
    write_bad_images,
    write_good_images,
)

from calibclust.errors import InputError  # noqa: E402
from calibclust.io.images import decode_image  # noqa: E402
from calibclust.metadata import MetadataError  # noqa: E402
from calibclust.serve import backends  # noqa: E402
from calibclust.serve.labeler import Labeler, topk_columns  # noqa: E402
from calibclust.serve.policy import Policy  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("m") / "model.onnx", metadata={"cluster_names": ["red", "green", "blue"]})


def test_predict_matches_numpy_reference(model):
    rng = np.random.default_rng(0)
    images = np.stack([colour_image(rng.random(3)) for _ in range(40)] + [colour_image((1, 0, 0))])
    images[:, 3:7, 5:9] = rng.integers(0, 256, (41, 4, 4, 3))  # not flat: mean pooling matters
    lab = Labeler(model, backend="cpu")  # the exact reference; GPU numerics: test_cuda_backend_matches_cpu
    out = lab.predict(images)
    ref = expected_probs(images)
    assert np.abs(out["probs"] - ref).max() < 1e-5, np.abs(out["probs"] - ref).max()
    np.testing.assert_array_equal(out["label"], ref.argmax(1))
    np.testing.assert_allclose(out["confidence"], ref.max(1), atol=1e-5)
    np.testing.assert_allclose(out["ood_score"], 1 - ref.max(1), atol=1e-5)
    assert lab.backend_name == "cpu" and lab.cluster_names == ["red", "green", "blue"]
    assert lab.input_size == (16, 16)
    assert lab.predict(images[:0])["confidence"].shape == (0,)


def test_predict_refuses_wrong_input(model):
    lab = Labeler(model)
    with pytest.raises(InputError, match=r"uint8 images of shape \(N, 16, 16, 3\)"):
        lab.predict(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(InputError, match=r"labeler.decode\(path\)"):
        lab.predict(np.zeros((2, 32, 32, 3), np.uint8))


def test_label_files_with_errors_and_topk(model, tmp_path):
    good = write_good_images(tmp_path / "good", 7)
    bad = write_bad_images(tmp_path / "bad")
    paths = [str(p) for p in good] + [str(tmp_path / "bad" / name) for name in sorted(bad)]
    lab = Labeler(model, backend="cpu", max_pixels=30_000)
    table, thresholds = lab.label(paths, top_k=2, batch_size=3)
    assert table["path"] == paths
    for i, name in enumerate(sorted(bad), start=len(good)):
        assert table["decision"][i] == "error" and table["cluster"][i] == -1
        assert bad[name] in table["error"][i], (name, table["error"][i])
    decoded = np.stack([decode_image(p, size=(16, 16)) for p in good])
    ref = expected_probs(decoded)
    np.testing.assert_array_equal(table["cluster"][: len(good)], ref.argmax(1))
    np.testing.assert_allclose(table["confidence"][: len(good)], ref.max(1), atol=1e-5)
    second = np.sort(ref, axis=1)[:, -2]
    np.testing.assert_allclose(table["top2_prob"][: len(good)], second, atol=1e-5)
    assert table["top1_cluster"][: len(good)] == table["cluster"][: len(good)]
    assert table["cluster_name"][0] == ["red", "green", "blue"][table["cluster"][0]]
    assert thresholds.n_images == len(good)
    # The default policy is the model's own thresholds.
    conf = np.asarray(table["confidence"][: len(good)])
    ood = np.asarray(table["ood_score"][: len(good)])
    expected = np.where(ood > 0.6, "ood", np.where(conf >= 0.5, "accepted", "rejected"))
    assert table["decision"][: len(good)] == expected.tolist()
    table2, th2 = lab.label(paths, policy=Policy("coverage", 0.5))
    assert th2.policy == "coverage" and th2.n_accepted >= 1


def test_topk_columns_handles_error_rows():
    probs = np.array([[0.1, 0.7, 0.2], [np.nan, np.nan, np.nan]])
    cols = topk_columns(probs, 5)
    assert list(cols) == ["top1_cluster", "top1_prob", "top2_cluster", "top2_prob", "top3_cluster", "top3_prob"]
    assert cols["top1_cluster"] == [1, -1] and cols["top3_cluster"][0] == 0
    assert cols["top2_prob"][0] == pytest.approx(0.2) and np.isnan(cols["top2_prob"][1])


def test_model_without_metadata_is_refused(tmp_path):
    path = make_contract_model(tmp_path / "nometa.onnx", with_metadata=False)
    with pytest.raises(MetadataError, match="no calibclust metadata"):
        Labeler(path)


def test_model_with_other_schema_version_is_refused(tmp_path):
    doc = json.loads(Labeler(make_contract_model(tmp_path / "ok.onnx")).metadata.to_json())
    doc["schema_version"] = 99
    path = make_contract_model(tmp_path / "v99.onnx", raw_metadata=json.dumps(doc))
    with pytest.raises(MetadataError, match="schema_version is 99"):
        Labeler(path)


def test_model_inconsistent_with_graph_is_refused(tmp_path):
    # Metadata says 5 clusters and 32x32 input; the graph has 3 outputs and 16x16 input.
    path = make_contract_model(tmp_path / "bad.onnx", metadata={"num_clusters": 5, "input_size": (32, 32), "cluster_names": []})
    with pytest.raises(MetadataError) as err:
        Labeler(path)
    assert "input_size" in str(err.value) and "width 3, expected 5" in str(err.value), str(err.value)


def test_backend_resolution_here():
    assert backends.resolve_backend("auto", "m.onnx") == backends.available_backends()[0]
    assert "cpu" in backends.available_backends()
    missing = [b for b in ("cuda", "tensorrt") if b not in backends.available_backends()]
    for name in missing:
        with pytest.raises(backends.BackendError, match=f"backend '{name}' is not available"):
            backends.resolve_backend(name, "m.onnx")
    with pytest.raises(InputError, match="unknown backend 'tpu'"):
        backends.resolve_backend("tpu", "m.onnx")
    with pytest.raises(backends.BackendError, match="no installed backend runs '.engine' files"):
        backends.resolve_backend("auto", "m.engine")


def test_auto_passes_over_a_listed_provider_that_does_not_start(model, monkeypatch):
    """onnxruntime-gpu lists TensorRT (and CUDA) whether or not their libraries are installed; ``auto``
    must start the first provider that really runs and say which ones it passed over. Here every
    provider is 'listed': a CPU build starts neither TensorRT nor CUDA, a GPU machine without
    TensorRT libraries (seen on an H100 with onnxruntime-gpu 1.31.1) starts CUDA."""
    real = backends.available_providers()
    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(backends, "available_providers", lambda: listed)
    notes = []
    backend = backends.create_backend(model, "auto", log=notes.append)
    if backend.name == "tensorrt":
        pytest.skip("TensorRT starts on this machine: nothing to fall back from")
    expected = "cuda" if "CUDAExecutionProvider" in real else "cpu"
    assert backend.name == expected and backend.session.get_providers()[0] == backends._PROVIDERS[expected]
    skipped = ["tensorrt"] + (["cuda"] if expected == "cpu" else [])
    assert [n.split()[2] for n in notes] == skipped, notes
    assert all(n.startswith("backend auto: ") and "not usable here" in n for n in notes), notes
    with pytest.raises(backends.ProviderUnavailable, match="backend 'tensorrt' requested but onnxruntime started"):
        backends.create_backend(model, "tensorrt")


@pytest.mark.gpu
def test_cuda_backend_matches_cpu(model):
    """onnxruntime's CUDA provider against the CPU one on the same images: same labels, outputs within
    1e-3 (cuDNN may use TF32 convolutions; the quick start's model differed by 1.3e-3 in confidence
    on an H100 with 1 of 1,977 decisions changed at the threshold)."""
    if "cuda" not in backends.available_backends():
        pytest.skip("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    rng = np.random.default_rng(1)
    images = np.stack([colour_image(rng.random(3)) for _ in range(64)])
    images[:, 3:7, 5:9] = rng.integers(0, 256, (64, 4, 4, 3))
    cpu, cuda = Labeler(model, backend="cpu").predict(images), Labeler(model, backend="cuda").predict(images)
    np.testing.assert_array_equal(cuda["label"], cpu["label"])
    for name in ("probs", "confidence", "ood_score"):
        np.testing.assert_allclose(cuda[name], cpu[name], atol=1e-3, err_msg=name)


def test_tensorrt_provider_options_cover_every_batch(model):
    backend = backends.OrtBackend.__new__(backends.OrtBackend)
    backend.model_path = str(model)
    chain = backend._providers("tensorrt", backends.OrtOptions(max_batch_size=128, trt_cache_dir="/tmp/x"))
    assert [c[0] if isinstance(c, tuple) else c for c in chain] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = chain[0][1]
    assert trt["trt_profile_min_shapes"] == "images:1x16x16x3"
    assert trt["trt_profile_max_shapes"] == "images:128x16x16x3"
    assert trt["trt_engine_cache_path"] == "/tmp/x" and trt["trt_engine_cache_enable"]
    assert backend._providers("cpu", backends.OrtOptions()) == ["CPUExecutionProvider"]


class _FakeEngine:
    """A plugin backend like a native TensorRT runner would be: its own metadata, its own run()."""

    suffixes = (".engine",)

    def __init__(self, model_path, threads=None, max_batch_size=None):
        from calibclust.contract import read_model_metadata

        self._inner = backends.OrtBackend(str(model_path) + ".onnx")
        self.metadata = read_model_metadata(str(model_path) + ".onnx")
        self.name, self.default_batch_size, self.calls = "fake-engine", 7, 0

    def run(self, images, outputs=backends.CONTRACT_OUTPUTS):
        self.calls += 1
        return self._inner.run(images, outputs)


class _EP:
    def __init__(self, obj):
        self.obj = obj

    def load(self):
        return self.obj


def test_plugin_backend_hook(tmp_path, monkeypatch):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"opaque")
    make_contract_model(tmp_path / "m.engine.onnx")
    monkeypatch.setattr(backends, "plugin_backends", lambda: {"fake-engine": _EP(_FakeEngine)})
    assert backends.resolve_backend("auto", engine) == "fake-engine"
    lab = Labeler(engine)
    assert lab.backend_name == "fake-engine" and lab.batch_size == 7 and lab.num_clusters == 3
    out = lab.predict(np.stack([colour_image((0, 1, 0))]))
    assert out["label"].tolist() == [1] and lab.backend.calls == 1


def test_labeler_resizes_by_the_models_policy(tmp_path):
    """The policy named in the metadata is what label / demo / predict_proba apply to every file."""
    from PIL import Image

    wide = np.zeros((20, 80, 3), np.uint8)
    wide[:, :, 1] = 200
    Image.fromarray(wide).save(tmp_path / "wide.png")
    squash = Labeler(make_contract_model(tmp_path / "squash.onnx"))
    letterbox = Labeler(make_contract_model(tmp_path / "letterbox.onnx", metadata={"resize": "letterbox"}))
    assert squash.decode(tmp_path / "wide.png")[:, :, 1].min() == 200, "squash stretches the image over the frame"
    boxed = letterbox.decode(tmp_path / "wide.png")
    assert boxed[:5].max() == 0 and boxed[-5:].max() == 0 and boxed[8, :, 1].min() == 200, "letterbox pads top and bottom"
    assert not np.allclose(squash.predict_proba([tmp_path / "wide.png"]), letterbox.predict_proba([tmp_path / "wide.png"]))


def test_label_folder_names_unknown_options(tmp_path):
    labeler = Labeler(make_contract_model(tmp_path / "m.onnx"))
    with pytest.raises(InputError, match="unknown option.*colour"):
        labeler.label_folder(tmp_path, tmp_path / "out", colour=True)
    with pytest.raises(InputError, match="one rejection policy"):
        labeler.label_folder(tmp_path, tmp_path / "out", target_accuracy=0.9, coverage=0.5)
