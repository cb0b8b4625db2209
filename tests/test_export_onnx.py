"""ONNX export of the model contract: round trip, raw uint8 in, parity gate, metadata, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from calibclust.contract import read_model_metadata
from calibclust.datasets import digits_images
from calibclust.metadata import ONNX_METADATA_KEY, MetadataError, ModelMetadata
from calibclust.models.backbones import build_backbone
from calibclust.models.clustering import ClusteringModel, save_model

torch.set_num_threads(2)


def _model(seed: int = 0) -> ClusteringModel:
    torch.manual_seed(seed)
    model = ClusteringModel(build_backbone("small"), 10, hidden_dim=64)
    # Non-trivial BN statistics, so that folding BN into Conv in the exported graph is exercised.
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _metadata(**kw) -> ModelMetadata:
    return ModelMetadata(**{"num_clusters": 10, "input_size": (32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "backbone": "small", **kw})


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_images(32)
    return images, labels


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    from calibclust.export.onnx import OnnxExportConfig, export_onnx

    images, _ = digits
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(_model(), _metadata(cluster_names=[f"d{i}" for i in range(10)]), images[:800], path,
                         OnnxExportConfig(bank_size=512), log=lambda s: None)
    return result


def _torch_pipeline(model: ClusteringModel, images: np.ndarray):
    """The torch model used the way training does, written independently of ContractModule."""
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
        x = (x - torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)) / 0.25
        z = model.backbone(x)
        probs = torch.softmax(model.heads["calibration"](z), 1)
    return probs.numpy(), torch.nn.functional.normalize(z, dim=1).numpy()


def test_round_trip_predictions_equal_torch_on_digits(exported, digits):
    import onnxruntime as ort

    images, _ = digits
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    probs, confidence, label, ood, emb = session.run(None, {"images": images})
    ref_probs, ref_emb = _torch_pipeline(exported.module.model, images)
    diff = float(np.abs(probs - ref_probs).max())
    assert diff <= 1e-5, f"max |Δprobs| {diff:.2e} over {len(images)} digits"
    assert np.array_equal(label, ref_probs.argmax(1)), f"{int((label != ref_probs.argmax(1)).sum())} labels differ"
    assert label.dtype == np.int64 and confidence.dtype == np.float32
    np.testing.assert_allclose(confidence, ref_probs.max(1), atol=1e-5)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # kNN OOD score recomputed from the bank the graph carries: 5th-nearest Euclidean distance.
    bank = exported.module.ood.bank.numpy()
    kth = np.sort(ref_emb @ bank.T, axis=1)[:, -5]
    np.testing.assert_allclose(ood, np.sqrt(np.clip(2 - 2 * kth, 0, None)), atol=2e-3)


def test_raw_uint8_batches_of_any_size(exported, digits):
    """No Python pre/post-processing: uint8 NHWC in, the contract's outputs out, any batch size."""
    import onnxruntime as ort

    images, _ = digits
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for n in (1, 3, 257):
        batch = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) if n == 3 else images[:n]
        probs, confidence, label, ood, emb = session.run(None, {"images": batch})
        ref_probs, _ = _torch_pipeline(exported.module.model, batch)
        assert probs.shape == (n, 10) and confidence.shape == (n,) and label.shape == (n,) and ood.shape == (n,)
        assert emb.shape == (n, 128)
        assert float(np.abs(probs - ref_probs).max()) <= 1e-5
        assert np.array_equal(label, ref_probs.argmax(1))
    with pytest.raises(Exception, match=r"expected: \(tensor\(uint8\)\)"):
        session.run(None, {"images": images[:2].astype(np.float32)})


def test_file_carries_contract_metadata(exported):
    meta = read_model_metadata(exported.path)
    assert meta == exported.metadata
    assert meta.cluster_names[3] == "d3" and meta.embedding_dim == 128 and meta.precision == "fp32"
    assert meta.ood.score == "knn" and meta.ood.params == {"k": 5, "bank_size": 512}
    assert meta.ood.threshold > 0 and meta.ood.fitted_tpr == 0.95
    parity = meta.parity["fp32"]
    assert parity["passed"] and parity["label_mismatches"] == 0 and parity["max_abs_probs"] <= 1e-5
    assert meta.train_stats["n_images_export"] == 800 and 0 < meta.train_stats["mean_confidence"] <= 1
    assert meta.weights_digest.startswith("sha256:")
    model = onnx.load(str(exported.path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), "batch axis must stay dynamic"
    assert [o.name for o in model.graph.output] == ["probs", "confidence", "label", "ood_score", "embedding"]
    onnx.checker.check_model(model, full_check=True)


def test_ood_threshold_accepts_95_percent_of_training_images(exported, digits):
    import onnxruntime as ort

    images, _ = digits
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    ood = session.run(["ood_score"], {"images": images[:800]})[0]
    accepted = float(np.mean(ood <= exported.metadata.ood.threshold))
    # Fitted with leave-one-out for bank members; the served score includes the self-match, so
    # acceptance over the very same images is at least the fitted 95%.
    assert 0.95 <= accepted <= 1.0, f"accepted {accepted:.3f} of training images"


def test_refused_without_metadata_or_with_wrong_schema(exported, tmp_path):
    model = onnx.load(str(exported.path))
    doc = json.loads(next(p.value for p in model.metadata_props if p.key == ONNX_METADATA_KEY))
    doc["schema_version"] = 2
    for p in model.metadata_props:
        if p.key == ONNX_METADATA_KEY:
            p.value = json.dumps(doc)
    onnx.save(model, str(tmp_path / "v2.onnx"))
    with pytest.raises(MetadataError, match="schema_version is 2"):
        read_model_metadata(tmp_path / "v2.onnx")
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(MetadataError, match="no calibclust metadata"):
        read_model_metadata(tmp_path / "bare.onnx")


def test_perturbed_graph_fails_the_parity_gate(exported, digits, tmp_path):
    from onnx import numpy_helper

    from calibclust.export.parity import FP32_GATE, ParityError, compare_outputs, enforce, ort_session, session_outputs, torch_outputs

    images, _ = digits
    model = onnx.load(str(exported.path))
    # Nudge one weight of the last layer by 0.05: a small change, far beyond 1e-5 in probs.
    target = next(t for t in model.graph.initializer if numpy_helper.to_array(t).shape in ((10, 64), (64, 10)))
    array = numpy_helper.to_array(target).copy()
    array[0, 0] += 0.05
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    sample = images[:256]
    ref = torch_outputs(exported.module, sample)
    report = compare_outputs(ref, session_outputs(ort_session(model.SerializeToString()), sample), "torch", "perturbed")
    with pytest.raises(ParityError, match=r"fp32 parity gate failed: max\|Δprobs\|") as err:
        enforce(report, FP32_GATE)
    assert err.value.report.max_abs_probs > 1e-5
    # the untouched file passes the same gate
    ok = compare_outputs(ref, session_outputs(ort_session(exported.path), sample), "torch", "exported")
    assert enforce(ok, FP32_GATE).passed


def test_failed_parity_writes_nothing(digits, tmp_path, monkeypatch):
    from calibclust.export import onnx as export_module
    from calibclust.export.parity import ParityError

    real = export_module.session_outputs

    def corrupted(session, images, batch_size=256):
        out = real(session, images, batch_size)
        out["label"] = (out["label"] + 1) % 10
        return out

    monkeypatch.setattr(export_module, "session_outputs", corrupted)
    out = tmp_path / "never.onnx"
    with pytest.raises(ParityError, match="labels differ"):
        export_module.export_onnx(_model(), _metadata(), digits[0][:64], out, log=lambda s: None)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("ood", ["msp", "energy", "prototype"])
def test_other_ood_scores_and_torchscript_fallback(digits, tmp_path, ood):
    from calibclust.export.onnx import OnnxExportConfig, export_onnx

    images, _ = digits
    result = export_onnx(_model(1), _metadata(), images[:200], tmp_path / "m.onnx",
                         OnnxExportConfig(ood_score=ood, exporter="torchscript", include_embedding=False), log=lambda s: None)
    assert result.exporter == "torchscript"
    meta = read_model_metadata(result.path)
    assert meta.ood.score == ood and meta.parity["fp32"]["passed"]
    assert meta.parity["fp32"]["max_abs_ood_score"] <= 1e-4, "in-graph OOD score must equal the torch one"
    model = onnx.load(str(result.path))
    assert [o.name for o in model.graph.output] == ["probs", "confidence", "label", "ood_score"]


def test_slim_flag(digits, tmp_path):
    pytest.importorskip("onnxslim", reason="onnxslim not installed (optional, export extra)")
    from calibclust.export.onnx import OnnxExportConfig, export_onnx

    result = export_onnx(_model(2), _metadata(), digits[0][:100], tmp_path / "s.onnx", OnnxExportConfig(slim=True), log=lambda s: None)
    assert any(n.startswith("onnxslim") for n in result.notes), result.notes
    assert read_model_metadata(result.path).parity["fp32"]["passed"]


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    from calibclust.cli import main
    from calibclust.datasets import make_digits_folder

    ckpt = save_model(_model(3), tmp_path / "ckpt", _metadata(cluster_names=[f"c{i}" for i in range(10)]))
    folder = make_digits_folder(tmp_path / "digits", limit=120)
    out = tmp_path / "out" / "model.onnx"
    code = main(["export", "onnx", "--model", str(ckpt), "--images", str(folder), "--out", str(out), "--bank-size", "64",
                 "--int8", "--calibration-images", "40"])
    captured = capsys.readouterr().out
    assert code == 0, captured
    assert "parity" in captured and "max|Δprobs|" in captured and "label agreement with fp32" in captured
    assert read_model_metadata(out.with_suffix(".int8.onnx")).precision == "int8"
    meta = read_model_metadata(out)
    assert meta.cluster_names[0] == "c0" and meta.ood.params["bank_size"] == 64
    assert meta.train_stats["n_images_export"] == 120
    # a missing folder is a usage error, not a traceback
    assert main(["export", "onnx", "--model", str(ckpt), "--images", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_flop_count_from_the_graph_matches_torch_counter(exported):
    from torch.utils.flop_counter import FlopCounterMode

    from calibclust.export.bench import count_flops

    flops, unknown = count_flops(onnx.load(str(exported.path)))
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        exported.module(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    assert not unknown
    assert flops == pytest.approx(counter.get_total_flops(), rel=1e-3), (flops, counter.get_total_flops())


def test_bench_model_command_registers_and_runs(capsys):
    from calibclust.cli import build_parser
    from calibclust.export.cli import run_bench

    args = build_parser().parse_args(["bench", "model", "--backbone", "small", "--batch-sizes", "1,8", "--rounds", "1", "--head-steps", "5",
                              "--no-int8", "--no-tensorrt", "--devices", "cpu"])
    assert args.model is None and args.batch_sizes == [1, 8] and args.func is run_bench and args.devices == ("cpu",)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("torch eager", "onnxruntime fp32"))]
    assert len(rows) == 4, out
    assert all(float(r[-2]) > 0 for r in rows) and "GFLOP per image" in out


def test_bench_devices_are_checked():
    from calibclust.errors import InputError
    from calibclust.export.bench import resolve_devices

    assert resolve_devices(("cpu", "cpu")) == ("cpu",)
    assert resolve_devices(None) == (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    with pytest.raises(InputError, match="--devices takes cpu and/or cuda"):
        resolve_devices(("tpu",))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="torch.cuda.is_available.. is False"):
            resolve_devices(("cuda",))


@pytest.mark.gpu
def test_bench_gpu_rows(capsys):
    """GPU rows: torch eager fp32 (the ratio base, 1.00), fp16 autocast and, with onnxruntime-gpu,
    onnxruntime's CUDA provider; every row ran and has a throughput."""
    from calibclust.cli import build_parser

    args = build_parser().parse_args(["bench", "model", "--backbone", "small", "--batch-sizes", "1,64", "--rounds", "2",
                                      "--head-steps", "5", "--no-int8", "--no-tensorrt", "--devices", "cuda"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    # backend words, then: device, batch, images/s, p50, p95, x torch, GFLOP/s
    rows = [r for r in (line.split() for line in out.splitlines()) if len(r) >= 9 and r[-7] == "cuda"]
    backends = {" ".join(r[:-7]) for r in rows}
    assert {"torch eager", "torch fp16 autocast"} <= backends, out
    base = [float(r[-2]) for r in rows if " ".join(r[:-7]) == "torch eager"]
    assert base == [1.0, 1.0], out
    assert all(float(r[-5]) > 0 for r in rows), out


def test_gradient_input_filter_is_part_of_the_exported_graph(digits, tmp_path):
    """A model whose backbone sees gradient magnitudes (``--input-filter gradient``) exports with
    the filter inside the graph: onnxruntime matches torch, and the saved model rebuilds it."""
    from calibclust.export.onnx import export_onnx
    from calibclust.models.backbones import backbone_label, with_input_filter
    from calibclust.models.clustering import load_model

    torch.manual_seed(0)
    model = ClusteringModel(with_input_filter(build_backbone("small"), "gradient"), 10, hidden_dim=64).eval()
    images = digits[0][:200]
    result = export_onnx(model, _metadata(backbone=backbone_label(model.backbone)), images, tmp_path / "g.onnx", log=lambda s: None)
    parity = read_model_metadata(result.path).parity["fp32"]
    assert parity["passed"] and parity["label_mismatches"] == 0 and parity["max_abs_probs"] <= 1e-5, parity
    assert any(node.op_type == "ReduceMax" for node in onnx.load(str(result.path)).graph.node), "the per-image maximum is in the graph"
    save_model(model, tmp_path / "saved", _metadata(backbone="small+gradient"))
    loaded, _ = load_model(tmp_path / "saved")
    np.testing.assert_allclose(_torch_pipeline(loaded, images[:20])[0], _torch_pipeline(model, images[:20])[0], atol=1e-6)
