"""TensorRT engines. GPU tests are marked ``gpu`` and skip without CUDA + tensorrt; the FP16 graph
conversion they build on is checked on CPU through onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from calibclust.datasets import digits_images
from calibclust.metadata import MetadataError, ModelMetadata

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from calibclust.export.onnx import OnnxExportConfig, export_onnx
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small"), 10, hidden_dim=64).eval()
    meta = ModelMetadata(num_clusters=10, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    images = digits_images(32)[0][:300]
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(model, meta, images, path, OnnxExportConfig(bank_size=128), log=lambda s: None)
    return path, images


def test_fp16_graph_keeps_io_and_tail_in_fp32_and_runs(exported):
    from onnx import TensorProto

    from calibclust.export.parity import ort_session, session_outputs
    from calibclust.export.tensorrt import convert_to_fp16

    path, images = exported
    fp16 = convert_to_fp16(onnx.load(str(path)))
    onnx.checker.check_model(fp16, full_check=True)
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [o.type.tensor_type.elem_type for o in fp16.graph.output] == [TensorProto.FLOAT] * 2 + [TensorProto.INT64] + [TensorProto.FLOAT] * 2
    init = {t.name: t for t in fp16.graph.initializer}
    conv_weights = [init[n.input[1]].data_type for n in fp16.graph.node if n.op_type == "Conv"]
    assert conv_weights and set(conv_weights) == {TensorProto.FLOAT16}
    tail = [init[i].data_type for n in fp16.graph.node if n.op_type in ("Gemm", "MatMul") for i in n.input if i in init]
    assert tail and set(tail) == {TensorProto.FLOAT}, "head and kNN bank stay fp32"
    ref = session_outputs(ort_session(path), images[:128])
    got = session_outputs(ort_session(fp16.SerializeToString()), images[:128])
    diff = float(np.abs(ref["confidence"] - got["confidence"]).max())
    assert diff <= 1e-2, f"fp16 graph max |Δconfidence| {diff:.2e}"


def test_missing_tensorrt_is_a_clear_error(monkeypatch):
    import builtins

    from calibclust.errors import MissingDependencyError
    from calibclust.export.tensorrt import import_tensorrt

    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("blocked for the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    with pytest.raises(MissingDependencyError, match=r"calibclust\[tensorrt\]"):
        import_tensorrt()


def _gpu_ready():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    pytest.importorskip("tensorrt", reason="tensorrt not installed (pip install 'calibclust[tensorrt]')")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engine_passes_parity_and_loads(exported, tmp_path, precision):
    _gpu_ready()
    from calibclust.export.tensorrt import TensorRTConfig, build_engine, load_engine

    path, images = exported
    out = tmp_path / f"model.{precision}.engine"
    result = build_engine(path, out, TensorRTConfig(precision=precision, min_batch=1, opt_batch=32, max_batch=64), images=images)
    print(result.parity.summary())
    assert out.is_file() and result.sidecar.is_file() and (tmp_path / f"model.{precision}.engine.timing").is_file()
    runner, sidecar = load_engine(out)
    assert sidecar.metadata.precision == precision and sidecar.info["batch_profile"] == [1, 32, 64]
    outputs = runner(images[:100])
    assert outputs["probs"].shape == (100, 10) and outputs["label"].dtype == np.int64
    assert result.parity.passed


@pytest.mark.gpu
def test_int8_engine_from_qdq_model(tmp_path):
    _gpu_ready()
    from calibclust.export.int8 import Int8Config, quantize_int8
    from calibclust.export.onnx import export_onnx
    from calibclust.export.selflabel import pseudo_label_digits_model
    from calibclust.export.tensorrt import TensorRTConfig, build_engine

    images = digits_images(32)[0]
    model = pseudo_label_digits_model(steps=150)
    meta = ModelMetadata(num_clusters=10, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    fp32 = export_onnx(model, meta, images, tmp_path / "m.onnx", log=lambda s: None).path
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx", images, Int8Config()).path
    result = build_engine(int8, tmp_path / "m.int8.engine", TensorRTConfig(precision="int8"), images=images[:512])
    print(result.parity.summary())
    assert result.parity.label_agreement >= 0.99


@pytest.mark.gpu
def test_engine_from_other_gpu_or_version_is_refused(exported, tmp_path):
    _gpu_ready()
    from calibclust.export.tensorrt import TensorRTConfig, build_engine, load_engine

    path, images = exported
    out = tmp_path / "model.engine"
    build_engine(path, out, TensorRTConfig(max_batch=64, opt_batch=32), images=images)
    sidecar_path = tmp_path / "model.engine.json"
    doc = json.loads(sidecar_path.read_text())
    doc["compute_capability"] = [1, 0]
    sidecar_path.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="compute capability 1.0"):
        load_engine(out)
    doc["compute_capability"] = list(torch.cuda.get_device_capability(0))
    doc["tensorrt_version"] = "0.0.1"
    sidecar_path.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="built with TensorRT 0.0.1"):
        load_engine(out)


def test_duplicate_casts_from_older_converters_are_merged():
    """onnxruntime < 1.32's float16 converter writes one Cast per fp32 consumer, all with the same
    output name (onnx.checker: not SSA; seen with onnxruntime-gpu 1.31.1 on an H100)."""
    from onnx import TensorProto, helper

    from calibclust.export.tensorrt import TensorRTError, _drop_duplicate_casts

    cast = lambda: helper.make_node("Cast", ["h"], ["h_cast_to_fp32"], to=TensorProto.FLOAT)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["h"]), cast(), helper.make_node("Relu", ["h_cast_to_fp32"], ["a"]),
         cast(), helper.make_node("Neg", ["h_cast_to_fp32"], ["b"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(onnx.checker.ValidationError, match="single static assignment"):
        onnx.checker.check_model(model, full_check=True)
    _drop_duplicate_casts(model.graph)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Identity", "Cast", "Relu", "Neg"]
    model.graph.node.append(helper.make_node("Cast", ["x"], ["h_cast_to_fp32"], to=TensorProto.FLOAT))
    with pytest.raises(TensorRTError, match="two different Cast nodes"):
        _drop_duplicate_casts(model.graph)
