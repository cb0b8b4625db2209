"""Triton model repository: the generated config.pbtxt parsed back and checked against the contract."""

from __future__ import annotations

import json
import re

import pytest
import torch

from calibclust.contract import EngineSidecar, write_engine_sidecar
from calibclust.errors import InputError
from calibclust.export.triton import TritonConfig, write_triton_repository
from calibclust.metadata import ModelMetadata, OODSpec

torch.set_num_threads(2)

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))')


def parse_pbtxt(text: str) -> dict:
    """A small protobuf text-format parser (messages, repeated fields, lists, strings, numbers,
    enums), written independently of the generator. Repeated keys become lists."""
    tokens = [m.group(2) or m.group(3) or m.group(4) for m in _TOKEN.finditer(text) if not m.group(1)]
    tokens = [t for t in tokens if t]
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return json.loads(tok)
        try:
            return int(tok)
        except ValueError:
            return tok

    def message(end):
        nonlocal pos
        out: dict = {}
        repeated: set = set()
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            val = value()
            if key in repeated:
                out[key].append(val)
            elif key in out:
                out[key] = [out[key], val]
                repeated.add(key)
            else:
                out[key] = val
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    return message(None)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from calibclust.datasets import digits_images
    from calibclust.export.onnx import OnnxExportConfig, export_onnx
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small"), 7, hidden_dim=32).eval()
    meta = ModelMetadata(num_clusters=7, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    path = tmp_path_factory.mktemp("triton") / "digits.onnx"
    export_onnx(model, meta, digits_images(32)[0][:100], path, OnnxExportConfig(bank_size=64), log=lambda s: None)
    return path


def _by_name(items):
    return {item["name"]: item for item in items}


def test_onnx_repository_config_parses_and_matches_contract(onnx_model, tmp_path):
    folder = write_triton_repository(onnx_model, tmp_path / "repo", TritonConfig(preferred_batch_sizes=[8, 64], max_batch_size=128))
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["name"] == "digits" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 128
    (image,) = cfg["input"]
    assert image == {"name": "images", "data_type": "TYPE_UINT8", "dims": [32, 32, 3]}
    outputs = _by_name(cfg["output"])
    assert set(outputs) == {"probs", "confidence", "label", "ood_score", "embedding"}
    assert outputs["probs"]["dims"] == [7] and outputs["probs"]["data_type"] == "TYPE_FP32"
    assert outputs["embedding"]["dims"] == [128]
    assert outputs["label"]["data_type"] == "TYPE_INT64"
    for scalar in ("confidence", "label", "ood_score"):
        assert outputs[scalar]["dims"] == [1] and outputs[scalar]["reshape"] == {"shape": []}
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [8, 64], "max_queue_delay_microseconds": 500}
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    meta = ModelMetadata.from_json(cfg["parameters"]["value"]["string_value"])
    assert meta.num_clusters == 7 and meta.ood.score == "knn"
    assert json.loads((folder / "calibclust_metadata.json").read_text())["num_clusters"] == 7


def test_existing_folder_needs_force(onnx_model, tmp_path):
    write_triton_repository(onnx_model, tmp_path, TritonConfig(name="m"))
    with pytest.raises(InputError, match="pass --overwrite"):
        write_triton_repository(onnx_model, tmp_path, TritonConfig(name="m"))
    write_triton_repository(onnx_model, tmp_path, TritonConfig(name="m", force=True, version=3))
    assert (tmp_path / "m" / "3" / "model.onnx").is_file() and not (tmp_path / "m" / "1").exists()


def test_engine_repository_uses_tensorrt_plan(tmp_path):
    engine = tmp_path / "digits.engine"
    engine.write_bytes(b"plan bytes")
    meta = ModelMetadata(num_clusters=5, input_size=(16, 24), mean=(0.5,) * 3, std=(0.2,) * 3, embedding_dim=64,
                         ood=OODSpec(threshold=0.3), precision="fp16", cluster_names=['say "hi"', "café", "a\\b", "d", "e"])
    outputs = [["probs", "float32", [-1, 5]], ["confidence", "float32", [-1]], ["label", "int64", [-1]],
               ["ood_score", "float32", [-1]]]
    write_engine_sidecar(engine, EngineSidecar(meta, "10.13.0.35", "NVIDIA H100", (9, 0), {"outputs": outputs}))
    folder = write_triton_repository(engine, tmp_path / "repo")
    assert (folder / "1" / "model.plan").read_bytes() == b"plan bytes"
    cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["platform"] == "tensorrt_plan" and cfg["instance_group"][0]["kind"] == "KIND_GPU"
    assert cfg["input"][0]["dims"] == [16, 24, 3]
    assert set(_by_name(cfg["output"])) == {"probs", "confidence", "label", "ood_score"}
    assert _by_name(cfg["output"])["probs"]["dims"] == [5]
    assert ModelMetadata.from_json(cfg["parameters"]["value"]["string_value"]) == meta


def test_cli_triton(onnx_model, tmp_path, capsys):
    from calibclust.cli import main as run_cli

    assert run_cli(["export", "triton", "--model", str(onnx_model), "--repo", str(tmp_path), "--name", "x", "--max-batch-size", "64"]) == 0
    cfg = parse_pbtxt((tmp_path / "x" / "config.pbtxt").read_text())
    assert cfg["max_batch_size"] == 64 and cfg["dynamic_batching"]["preferred_batch_size"] == [32]
    assert "tritonserver --model-repository" in capsys.readouterr().out
