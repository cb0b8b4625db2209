"""INT8: QDQ static quantisation of the contract graph, calibration reader, agreement gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from calibclust.contract import read_model_metadata
from calibclust.datasets import digits_images
from calibclust.export.int8 import Int8Config, QuantizationError, UInt8CalibrationReader, backbone_nodes, quantize_int8
from calibclust.metadata import ModelMetadata

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    from calibclust.export.onnx import OnnxExportConfig, export_onnx
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    from calibclust.export.selflabel import fit_heads, thumbnail_kmeans_labels

    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small"), 10, hidden_dim=64).eval()
    images = digits_images(32)[0][:600]
    # Heads fitted on pseudo-labels, so labels depend on the image (a random network predicts
    # nearly one cluster everywhere, which any quantisation "agrees" with).
    fit_heads(model, images, thumbnail_kmeans_labels(images, 10), steps=100)
    meta = ModelMetadata(num_clusters=10, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    path = tmp_path_factory.mktemp("int8") / "m.onnx"
    export_onnx(model, meta, images, path, OnnxExportConfig(bank_size=128), log=lambda s: None)
    return path, images


def test_calibration_reader_yields_uint8_batches_and_rewinds():
    images = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
    reader = UInt8CalibrationReader(images, batch_size=4)
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item["images"])
    assert [len(b) for b in batches] == [4, 4, 2] and len(reader) == 3
    assert all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["images"], images[:4])


def test_only_backbone_nodes_are_quantised(fp32_model):
    proto = onnx.load(str(fp32_model[0]))
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"n{i}"
    names = set(backbone_nodes(proto))
    ops = {n.name: n.op_type for n in proto.graph.node}
    convs = [n for n, op in ops.items() if op == "Conv"]
    assert set(convs) <= names and len(convs) == 9
    residual_adds = [n for n in names if ops[n] == "Add"]
    assert len(residual_adds) == 3, "one residual Add per block of the small backbone"
    assert not any(ops[n] in ("Gemm", "MatMul", "Softmax", "TopK") for n in names)
    assert len(backbone_nodes(proto, keep_stem_fp32=True)) == len(names) - 1


def test_quantised_model_is_written_with_metadata_and_qdq(fp32_model, tmp_path):
    path, images = fp32_model
    out = tmp_path / "m.int8.onnx"
    result = quantize_int8(path, out, images, Int8Config(min_agreement=0.5, calibration_images=128, eval_images=300), log=lambda s: None)
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 9 and ops.count("DequantizeLinear") >= 18
    meta = read_model_metadata(out)
    assert meta.precision == "int8" and meta.parity["int8"]["calibration_images"] == 128
    assert meta.parity["int8"]["n_images"] == 300 and meta.parity["fp32"]["passed"]
    assert meta.ood.threshold is not None and meta.ood.threshold != read_model_metadata(path).ood.threshold
    assert result.agreement.label_agreement >= 0.5 and result.speedup > 0
    # per-channel weights: the Conv weight scales are vectors, not scalars
    init = {t.name: t for t in proto.graph.initializer}
    scales = [init[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
              and init[n.input[0]].data_type == onnx.TensorProto.INT8 and len(init[n.input[0]].dims) == 4]
    assert scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)


def test_refuses_below_the_agreement_bar_and_writes_nothing(fp32_model, tmp_path, monkeypatch):
    import calibclust.export.int8 as int8_module

    class BlackImagesReader(UInt8CalibrationReader):
        """Calibration on black images: activation ranges far too narrow for real digits."""

        def __init__(self, images, *args, **kwargs):
            super().__init__(np.zeros_like(images), *args, **kwargs)

    monkeypatch.setattr(int8_module, "UInt8CalibrationReader", BlackImagesReader)
    path, images = fp32_model
    out = tmp_path / "refused.onnx"
    with pytest.raises(QuantizationError, match=r"refusing to write .*label agreement") as err:
        quantize_int8(path, out, images, Int8Config(calibration_images=64, eval_images=200), log=lambda s: None)
    assert "< 99.00%" in str(err.value)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_a_model_that_clusters_digits(tmp_path):
    """The 99% bar on a model whose backbone was trained (self-labelled, ~1 min on 2 cores)."""
    from calibclust.export.onnx import export_onnx
    from calibclust.export.selflabel import pseudo_label_digits_model

    images = digits_images(32)[0]
    model = pseudo_label_digits_model(steps=150)
    meta = ModelMetadata(num_clusters=10, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    fp32 = export_onnx(model, meta, images, tmp_path / "m.onnx", log=lambda s: None).path
    result = quantize_int8(fp32, tmp_path / "m.int8.onnx", images, Int8Config(), log=lambda s: None)
    assert result.agreement.label_agreement >= 0.99, result.agreement.summary()
