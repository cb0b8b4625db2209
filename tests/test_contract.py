"""The model contract reader: tiny hand-built ONNX graphs (no torch), read through onnxruntime and onnx."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibclust.contract import (
    EngineSidecar,
    TensorSig,
    check_engine_compat,
    check_signature,
    read_engine_sidecar,
    read_model_metadata,
    write_engine_sidecar,
    write_model_metadata,
)
from calibclust.metadata import ONNX_METADATA_KEY, MetadataError, ModelMetadata, OODSpec

C, H, W = 4, 8, 8


def _metadata(**changes) -> ModelMetadata:
    base = dict(
        num_clusters=C,
        input_size=(H, W),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        embedding_dim=3,
        ood=OODSpec(score="msp", threshold=0.4),
    )
    base.update(changes)
    return ModelMetadata(**base)


def _graph(
    input_dtype=TensorProto.UINT8,
    input_shape=("N", H, W, 3),
    num_clusters=C,
    drop_output: str | None = None,
    label_dtype=TensorProto.INT64,
) -> onnx.ModelProto:
    """uint8 NHWC → mean over pixels (N, 3) → linear → softmax, with the contract's five outputs."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(3, num_clusters)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["feat"], keepdims=0),
        helper.make_node("MatMul", ["feat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
        helper.make_node("LpNormalization", ["feat"], ["embedding"], axis=1, p=2),
    ]
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes += [
        helper.make_node("ReduceMax", ["probs", "one"], ["confidence"], keepdims=0),
        helper.make_node("Neg", ["confidence"], ["ood_score"]),
    ]
    if label_dtype != TensorProto.INT64:
        nodes[4] = helper.make_node("ArgMax", ["probs"], ["label64"], axis=1, keepdims=0)
        nodes.append(helper.make_node("Cast", ["label64"], ["label"], to=label_dtype))
    outputs = {
        "probs": helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num_clusters]),
        "confidence": helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["N"]),
        "label": helper.make_tensor_value_info("label", label_dtype, ["N"]),
        "ood_score": helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]),
        "embedding": helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3]),
    }
    if drop_output:
        outputs.pop(drop_output)
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", input_dtype, list(input_shape))],
        list(outputs.values()),
        initializer=[weight, axes, one],
    )
    if input_dtype != TensorProto.UINT8:
        graph.node[0].attribute[0].i = TensorProto.FLOAT
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("backend", ["onnxruntime", "onnx"])
def test_round_trip_reads_metadata_back(tmp_path, backend):
    meta = _metadata(cluster_names=["a", "b", "c", "d"])
    path = _save(write_model_metadata(_graph(), meta), tmp_path)
    back = read_model_metadata(path, backend=backend)
    assert back == meta
    assert back.cluster_names == ["a", "b", "c", "d"] and back.ood.threshold == 0.4


def test_reads_from_a_session_and_model_proto(tmp_path):
    import onnxruntime as ort

    meta = _metadata()
    model = write_model_metadata(_graph(), meta)
    path = _save(model, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert read_model_metadata(session) == meta
    assert read_model_metadata(model) == meta
    # and the graph runs on raw uint8 as the contract promises
    out = session.run(None, {"images": np.zeros((2, H, W, 3), np.uint8)})
    assert out[0].shape == (2, C)


def test_missing_metadata_is_refused_naming_the_key(tmp_path):
    path = _save(_graph(), tmp_path)
    with pytest.raises(MetadataError, match=f"no calibclust metadata.*{ONNX_METADATA_KEY!r}"):
        read_model_metadata(path)


def test_wrong_schema_version_is_refused(tmp_path):
    doc = _metadata().to_dict()
    doc["schema_version"] = 99
    model = _graph()
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(doc)
    path = _save(model, tmp_path)
    with pytest.raises(MetadataError, match="schema_version is 99"):
        read_model_metadata(path)


def test_garbage_and_unknown_keys_are_refused(tmp_path):
    model = _graph()
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, "{not json"
    with pytest.raises(MetadataError, match="not valid JSON"):
        read_model_metadata(_save(model, tmp_path))
    doc = _metadata().to_dict()
    doc["surprise"] = 1
    entry.value = json.dumps(doc)
    with pytest.raises(MetadataError, match="unknown keys in metadata: surprise"):
        read_model_metadata(_save(model, tmp_path, "b.onnx"))


def _with_raw_metadata(tmp_path, name: str, value: str):
    model = _graph()
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, value
    return _save(model, tmp_path, name)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ood": {"threshold": float("nan")}}, r"ood.threshold must be a finite number, got nan"),
        ({"ood": {"threshold": float("inf")}}, r"ood.threshold must be a finite number, got inf"),
        ({"ood": {"threshold": "0.3"}}, r"ood.threshold must be a number, got '0.3'"),
        ({"confidence_threshold": float("nan")}, r"confidence_threshold must be a finite number in \[0, 1\]"),
        ({"confidence_threshold": "high"}, "confidence_threshold must be a number, got 'high'"),
        ({"confidence_threshold": True}, "confidence_threshold must be a number, got True"),
        ({"cluster_names": "abcd"}, "cluster_names must be a list of strings"),
        ({"cluster_names": [1, 2, 3, 4]}, "cluster_names must be a list of strings"),
        ({"cluster_names": ["a", "b"]}, "2 cluster names for 4 clusters"),
        ({"num_clusters": "4"}, "num_clusters must be an integer >= 1, got '4'"),
        ({"input_size": ["a", 8]}, "input_size, mean and std must be lists of numbers"),
        ({"ood": 3}, "ood must be an object, got 3"),
    ],
)
def test_metadata_values_are_checked_naming_the_field(tmp_path, change, message):
    """A NaN OOD threshold used to load and silently turn OOD flags off; wrong types gave tracebacks."""
    doc = _metadata().to_dict()
    for key, value in change.items():
        if isinstance(value, dict):
            doc[key].update(value)
        else:
            doc[key] = value
    with pytest.raises(MetadataError, match=message):
        read_model_metadata(_with_raw_metadata(tmp_path, "m.onnx", json.dumps(doc)))


def test_oversized_and_deeply_nested_metadata_are_refused(tmp_path):
    doc = _metadata().to_dict()
    doc["train_stats"] = {"x": "y" * (5 << 20)}
    with pytest.raises(MetadataError, match="characters; at most"):
        read_model_metadata(_with_raw_metadata(tmp_path, "big.onnx", json.dumps(doc)))
    nested = '{"train_stats": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(MetadataError, match="nested too deeply"):
        read_model_metadata(_with_raw_metadata(tmp_path, "deep.onnx", nested))


@pytest.mark.parametrize(
    "graph_kwargs, meta_changes, message",
    [
        (dict(input_dtype=TensorProto.FLOAT), {}, "dtype float32, expected uint8"),
        (dict(input_shape=("N", 16, 16, 3)), {}, r"metadata input_size says \[N, 8, 8, 3\]"),
        (dict(input_shape=(1, H, W, 3)), {}, "fixed batch size 1"),
        ({}, dict(num_clusters=5, cluster_names=[]), "output 'probs' has width 4, expected 5"),
        (dict(drop_output="ood_score"), {}, r"missing outputs \['ood_score'\]"),
        (dict(label_dtype=TensorProto.INT32), {}, "output 'label' has dtype int32, expected int64"),
        ({}, dict(embedding_dim=7), "output 'embedding' has width 3, expected 7"),
        ({}, dict(ood=OODSpec(threshold=None)), "no fitted OOD threshold"),
    ],
)
def test_graph_inconsistent_with_metadata_is_refused(tmp_path, graph_kwargs, meta_changes, message):
    path = _save(write_model_metadata(_graph(**graph_kwargs), _metadata(**meta_changes)), tmp_path)
    for backend in ("onnxruntime", "onnx"):
        with pytest.raises(MetadataError, match=message):
            read_model_metadata(path, backend=backend)
    # check=False still parses the document
    assert read_model_metadata(path, check=False).num_clusters == _metadata(**meta_changes).num_clusters


def test_embedding_output_is_optional(tmp_path):
    path = _save(write_model_metadata(_graph(drop_output="embedding"), _metadata()), tmp_path)
    assert read_model_metadata(path).num_clusters == C


def test_write_merges_with_existing_props():
    model = _graph()
    helper.set_model_props(model, {"producer_note": "keep me", ONNX_METADATA_KEY: "old"})
    write_model_metadata(model, _metadata(), extra={"calibclust.parity": "ok"})
    write_model_metadata(model, _metadata(confidence_threshold=0.7))
    props = [(p.key, p.value) for p in model.metadata_props]
    keys = [k for k, _ in props]
    assert sorted(keys) == sorted(["producer_note", ONNX_METADATA_KEY, "calibclust.parity"]), keys
    assert dict(props)["producer_note"] == "keep me"
    assert ModelMetadata.from_json(dict(props)[ONNX_METADATA_KEY]).confidence_threshold == 0.7


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"hello")
    with pytest.raises(MetadataError, match="bad.onnx"):
        read_model_metadata(bad)
    with pytest.raises(MetadataError, match="no such model file"):
        read_model_metadata(tmp_path / "absent.onnx")


def test_check_signature_accepts_tensorrt_style_dynamic_dims():
    meta = _metadata()
    inputs = [TensorSig("images", "uint8", (-1, H, W, 3))]
    outputs = [
        TensorSig("probs", "float32", (-1, C)),
        TensorSig("confidence", "float32", (-1,)),
        TensorSig("label", "int64", (-1,)),
        TensorSig("ood_score", "float16", (-1,)),
    ]
    check_signature(meta, inputs, outputs)
    with pytest.raises(MetadataError, match=r"unexpected outputs \['logits'\]"):
        check_signature(meta, inputs, outputs + [TensorSig("logits", "float32", (-1, C))])


def test_engine_sidecar_round_trip_and_compat(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    sidecar = EngineSidecar(_metadata(precision="fp16"), "10.13.0.35", "NVIDIA H100", (9, 0), {"batch": [1, 32, 256]})
    write_engine_sidecar(engine, sidecar)
    back = read_engine_sidecar(engine)
    assert back == sidecar
    check_engine_compat(back, "10.13.0.35", (9, 0))
    with pytest.raises(MetadataError, match="built with TensorRT 10.13.0.35, this runtime is TensorRT 11.0.0"):
        check_engine_compat(back, "11.0.0", (9, 0))
    with pytest.raises(MetadataError, match=r"built for NVIDIA H100 \(compute capability 9.0\).*8.6"):
        check_engine_compat(back, "10.13.0.35", (8, 6))
    (tmp_path / "model.engine.json").unlink()
    with pytest.raises(MetadataError, match="no sidecar"):
        read_engine_sidecar(engine)


def test_contract_module_is_torch_free():
    code = "import sys, calibclust.contract; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resize_policy_travels_in_the_metadata_and_old_models_read_as_squash(tmp_path):
    from calibclust.metadata import MetadataError, ModelMetadata

    base = dict(num_clusters=3, input_size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert ModelMetadata(**base).resize == "squash"
    letterbox = ModelMetadata(**base, resize="letterbox")
    assert ModelMetadata.from_json(letterbox.to_json()).resize == "letterbox"
    old = {k: v for k, v in letterbox.to_dict().items() if k != "resize"}
    assert ModelMetadata.from_dict(old).resize == "squash"
    with pytest.raises(MetadataError, match="resize"):
        ModelMetadata(**base, resize="zoom")
