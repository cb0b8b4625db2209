"""timm backbones (``timm:NAME``): name validation without torch, building and rebuilding from the
spec, our checkpoint format, timm's pretrained weights from the Hugging Face cache (and the
offline error), and one CDC run through training, saving and ONNX export with parity.

The models are timm's own test models (``test_resnet``: 0.37 M parameters, ``test_vit``): random
init, 32×32 inputs, fast on 2 CPU cores. Nothing here touches the network: sockets are blocked
wherever timm could download.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from calibclust.models.names import BACKBONES, TIMM_PREFIX, backbone_name, is_timm

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm", reason="timm backbones need pip install 'calibclust[timm]'")

from calibclust.errors import InputError, MissingDependencyError  # noqa: E402
from calibclust.models.backbones import backbone_from_spec, backbone_spec, build_backbone  # noqa: E402
from calibclust.models.weights import BACKBONE_CONFIG, WeightsError, load_backbone, save_backbone  # noqa: E402

from model_fixtures import randomise, three_shapes  # noqa: E402

# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")




def _features(module, seed=0, size=32):
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return module.eval()(x)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test instead of reaching the internet."""
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, no_network):
    """An empty, offline Hugging Face cache under tmp_path. huggingface_hub reads HF_HUB_OFFLINE /
    HF_HUB_CACHE once at import, so its constants are patched as well as the environment."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# --- names (torch-free) -------------------------------------------------------------------------
@pytest.mark.parametrize("text", [*BACKBONES, "timm:resnet18", "timm:vit_small_patch16_224", "timm:resnet18.a1_in1k",
                                  "timm:mobilenetv3_large_100", "timm:convnext_atto.d2-in1k"])
def test_backbone_name_accepts_builtins_and_timm_names(text):
    assert backbone_name(text) == text
    assert is_timm(text) == text.startswith(TIMM_PREFIX)


@pytest.mark.parametrize("text, says", [
    ("resnet101", "unknown backbone 'resnet101'"),
    ("ResNet18", "lower case"),
    ("timm:", "name after 'timm:' is empty"),
    ("timm:vit small", "letters, digits"),
    ("timm:resnet18/x", "letters, digits"),
    ("resnet18:timm", "unknown backbone"),
])
def test_backbone_name_rejects_with_a_teaching_message(text, says):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        backbone_name(text)
    msg = str(info.value)
    assert says in msg
    assert "choose small, resnet18, resnet34, resnet50, or timm:NAME" in msg
    assert "timm:vit_small_patch16_224" in msg and "pip install 'calibclust[timm]'" in msg


def test_backbone_name_works_as_argparse_type():
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    parser.add_argument("--backbone", type=backbone_name, default="small")
    assert parser.parse_args(["--backbone", "timm:test_resnet"]).backbone == "timm:test_resnet"
    with pytest.raises(argparse.ArgumentError, match="timm:NAME"):
        parser.parse_args(["--backbone", "vgg16"])


def test_names_module_and_package_import_neither_torch_nor_timm():
    code = ("import sys, calibclust, calibclust.models.names; "
            "bad = {'torch', 'timm'} & set(sys.modules); assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_one_definition_of_the_builtin_backbones():
    from calibclust.models import backbones, names

    assert backbones.BACKBONES is names.BACKBONES


# --- building -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:test_vit", "timm:mobilenetv3_small_050"])
def test_build_and_spec_round_trip(name):
    torch.manual_seed(0)
    m = randomise(build_backbone(name, input_size=32, stem="cifar"), scale=0.5).eval()  # stem does not apply to timm
    assert m.spec == {"name": name, "input_size": 32}
    out = _features(m)
    # feature_dim is what forward returns (MobileNetV3's pre-logits layer makes it differ from num_features).
    assert out.shape == (4, m.feature_dim)
    rebuilt = backbone_from_spec(json.loads(json.dumps({**backbone_spec(m), "stem": "auto"})))
    missing, unexpected = rebuilt.load_state_dict(m.state_dict(), strict=True)
    assert not missing and not unexpected
    assert torch.equal(_features(rebuilt), out)


def test_fixed_size_models_are_built_for_the_input_size():
    m = build_backbone("timm:test_vit", input_size=48)  # test_vit's default is 160
    assert tuple(m.patch_embed.img_size) == (48, 48)
    assert _features(m, size=48).shape == (4, m.feature_dim)


def test_existing_backbones_are_unchanged():
    assert build_backbone("small").spec == {"name": "small", "input_size": 32, "stem": "stride2", "width": 32}
    assert build_backbone("resnet18", input_size=32).spec == {"name": "resnet18", "input_size": 32, "stem": "cifar"}
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")


def test_unknown_timm_model_lists_close_matches():
    with pytest.raises(InputError) as info:
        build_backbone("timm:vit_small_patch16")
    msg = str(info.value)
    assert "timm has no model 'vit_small_patch16'" in msg and "vit_small_patch16_224" in msg
    with pytest.raises(InputError, match="close matches: resnet18"):
        build_backbone("timm:resnet18x")
    with pytest.raises(InputError, match="no pretrained tag 'bogus' for resnet18; choose from .*a1_in1k"):
        build_backbone("timm:resnet18.bogus")


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'calibclust\[timm\]'"):
        build_backbone("timm:resnet18")


# --- our checkpoint format, third-party files -----------------------------------------------------
def test_save_and_load_backbone_round_trip_gives_identical_features(tmp_path, no_network):
    m = randomise(build_backbone("timm:test_resnet", input_size=32), 3, scale=0.5).eval()
    out = save_backbone(m, tmp_path / "bb", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), source={"kind": "test"})
    config = json.loads((out / BACKBONE_CONFIG).read_text())
    assert config["spec"] == {"name": "timm:test_resnet", "input_size": 32} and config["feature_dim"] == 96
    loaded = load_backbone(out)
    assert loaded.spec == m.spec and loaded.feature_dim == m.feature_dim
    assert loaded.normalization == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert torch.equal(_features(loaded, 1), _features(m, 1))


def test_third_party_timm_checkpoint_loads_with_a_timm_arch(tmp_path):
    ref = randomise(timm.create_model("test_resnet"), 4, scale=0.5).eval()  # with its classifier, as a training script saves it
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    m = load_backbone(path, arch="timm:test_resnet", input_size=32)
    assert m.load_report.ok and m.load_report.prefix == "module." and m.load_report.unexpected == ["fc.bias", "fc.weight"]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())


# --- timm's pretrained weights ------------------------------------------------------------------
def test_pretrained_weights_offline_error_names_the_cache(hf_cache):
    with pytest.raises(WeightsError) as info:
        load_backbone("timm", arch="timm:test_resnet", input_size=32)
    msg = str(info.value)
    assert "test_resnet.r160_in1k" in msg and str(hf_cache) in msg
    assert "HF_HUB_CACHE" in msg and "HF_HOME" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download timm/test_resnet.r160_in1k" in msg and "huggingface-cli download" in msg
    assert "models--timm--test_resnet.r160_in1k" in msg


def test_pretrained_weights_need_a_timm_arch_and_one_tag():
    with pytest.raises(InputError, match="arch='timm:NAME'"):
        load_backbone("timm", arch="resnet18")
    with pytest.raises(InputError, match="arch='timm:NAME'"):
        load_backbone("timm:a1_in1k")
    with pytest.raises(InputError, match="two pretrained tags"):
        load_backbone("timm:tv_in1k", arch="timm:resnet18.a1_in1k")
    with pytest.raises(InputError, match="no pretrained tag 'nope' for resnet18"):
        load_backbone("timm:nope", arch="timm:resnet18")


def _fill_cache(cache, repo_id, state):
    """What `hf download` leaves in the cache: refs/main naming a snapshot that holds the file."""
    from safetensors.torch import save_file

    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    (root / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_pretrained_weights_from_the_hf_cache_and_through_our_format(hf_cache, tmp_path):
    ref = randomise(timm.create_model("test_resnet"), 5, scale=0.5).eval()
    _fill_cache(hf_cache, "timm/test_resnet.r160_in1k", ref.state_dict())
    m = load_backbone("timm", arch="timm:test_resnet", input_size=32)
    # The resolved tag is pinned in the spec; timm's pretrained_cfg gives the normalisation.
    assert m.spec == {"name": "timm:test_resnet.r160_in1k", "input_size": 32}
    assert m.weights_source == {"kind": "timm", "arch": "timm:test_resnet", "weights": "test_resnet.r160_in1k"}
    assert m.normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert m.load_report.ok and not m.training
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    again = load_backbone(save_backbone(m, tmp_path / "bb"))  # rebuilt from the spec, no download
    assert again.weights_source == m.weights_source and again.normalization == m.normalization
    assert torch.equal(_features(again, 2), _features(m, 2))
    # The same weights by their explicit tag.
    assert load_backbone("timm:r160_in1k", arch="timm:test_resnet", input_size=32).spec == m.spec


# --- end to end: train, save, export, parity --------------------------------------------------------
def _shapes(n=96, size=32, seed=0):
    return three_shapes(n, size, seed)


def test_cdc_with_a_timm_backbone_trains_saves_and_exports_with_parity(tmp_path, no_network):
    pytest.importorskip("onnxruntime")
    from calibclust.export.onnx import OnnxExportConfig, export_onnx
    from calibclust.export.parity import compare_outputs, ort_session, session_outputs, torch_outputs
    from calibclust.models.clustering import load_model
    from calibclust.train.cdc import CDCConfig, CDCTrainer

    data = _shapes()
    config = CDCConfig(num_clusters=3, epochs=2, batch_size=48, sub_batch_size=24, hidden_dim=16, mini_clusters=6,
                       orth_steps=30, init_kmeans_restarts=1, minicluster_restarts=1)
    trainer = CDCTrainer(config, data, tmp_path / "run", backbone_name="timm:test_resnet", device="cpu",
                         progress=False, log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    result = trainer.fit()
    after = trainer.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight")), "backbone did not train"
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert result.metadata.backbone == "timm:test_resnet" and result.metadata.embedding_dim == 96

    model, metadata = load_model(result.model_dir)  # rebuilt from the saved spec
    assert model.backbone.spec == {"name": "timm:test_resnet", "input_size": 32}
    x = model.preprocess(torch.from_numpy(data.images[:8]))
    with torch.inference_mode():
        assert torch.equal(model.cluster_logits(x), result.model.eval().cluster_logits(x))

    # export_onnx runs the fp32 parity gate itself; the file it wrote is checked again here.
    exported = export_onnx(model, metadata, data.images, tmp_path / "model.onnx",
                           OnnxExportConfig(bank_size=64, parity_images=96), log=lambda s: None)
    assert exported.parity.passed
    session = ort_session(exported.path)
    report = compare_outputs(torch_outputs(exported.module, data.images), session_outputs(session, data.images),
                             "torch", "onnxruntime")
    assert report.max_abs_probs <= 1e-5 and report.label_mismatches == 0, report.summary()
    assert report.max_abs_embedding is not None and report.max_abs_embedding <= 1e-4, report.summary()
    assert os.path.getsize(exported.path) > 0
