"""Backbone checkpoints: our safetensors format, and weights made elsewhere (MoCo, SCAN,
torchvision) with key remapping and reporting."""

import argparse
import json
import urllib.error
import warnings

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torch import nn  # noqa: E402

from calibclust.models.backbones import build_backbone  # noqa: E402
from calibclust.models.weights import (  # noqa: E402
    BACKBONE_CONFIG,
    BACKBONE_WEIGHTS,
    IMAGENET_MEAN,
    WeightsError,
    infer_resnet_arch,
    load_backbone,
    read_state_dict,
    save_backbone,
)


from model_fixtures import randomise  # noqa: E402

# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")




def _moco_checkpoint(stem="imagenet"):
    """A checkpoint laid out like MoCo-v2's main_moco.py writes it (DataParallel keys)."""
    def encoder(seed):
        m = torchvision.models.resnet18()
        if stem == "cifar":
            m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        m.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        return randomise(m, seed)

    q, k = encoder(1), encoder(2)
    sd = {f"module.encoder_q.{n}": v for n, v in q.state_dict().items()}
    sd.update({f"module.encoder_k.{n}": v for n, v in k.state_dict().items()})
    sd["module.queue"] = torch.randn(128, 4096)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    ckpt = {"epoch": 800, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}
    return ckpt, q.state_dict()


def test_moco_pth_tar_is_remapped_to_the_same_tensors(tmp_path):
    ckpt, query = _moco_checkpoint()
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete load must not warn
        m = load_backbone(path)
    assert m.spec["name"] == "resnet18" and m.spec["stem"] == "imagenet"  # inferred from the keys
    report = m.load_report
    assert report.prefix == "module.encoder_q."
    assert sorted(report.unexpected) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]  # the MLP head
    assert not report.missing and not report.shape_mismatch
    assert report.ignored == len(ckpt["state_dict"]) - len(query)  # encoder_k + queue
    state = m.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, query[name]), name
    assert report.loaded == sorted(state)
    assert m.normalization["mean"] == list(IMAGENET_MEAN)
    assert not m.training


def test_scan_style_cifar_checkpoint_with_shortcut_names(tmp_path):
    # SCAN's CIFAR ResNet: keys under "backbone.", residual projections named "shortcut",
    # a contrastive head beside the backbone, everything nested under "model".
    ref = randomise(build_backbone("resnet18", input_size=32, stem="cifar"), 5)
    sd = {f"backbone.{k.replace('downsample.', 'shortcut.')}": v for k, v in ref.state_dict().items()}
    sd["contrastive_head.0.weight"] = torch.randn(512, 512)
    sd["contrastive_head.0.bias"] = torch.randn(512)
    path = tmp_path / "simclr_cifar-10.pth"
    torch.save({"model": sd, "epoch": 499}, path)
    m = load_backbone(path)
    assert m.spec["stem"] == "cifar" and m.spec["input_size"] == 32
    assert m.load_report.prefix == "backbone." and "shortcut" in m.load_report.renamed
    assert not m.load_report.missing
    for name, tensor in m.state_dict().items():
        assert torch.equal(tensor, ref.state_dict()[name]), name


def test_safetensors_round_trip_of_our_format(tmp_path):
    m = randomise(build_backbone("small", input_size=32, width=8), 3)
    out = save_backbone(m, tmp_path / "bb", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), source={"kind": "test"})
    assert (out / BACKBONE_WEIGHTS).is_file()
    config = json.loads((out / BACKBONE_CONFIG).read_text())
    assert config["spec"] == {"name": "small", "input_size": 32, "stem": "stride2", "width": 8}
    assert config["feature_dim"] == m.feature_dim == 32
    for path in (out, out / BACKBONE_CONFIG, out / BACKBONE_WEIGHTS):
        loaded = load_backbone(path)
        assert loaded.normalization == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
        a, b = m.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), loaded(x))
    # Saving a loaded backbone again keeps its normalisation.
    again = load_backbone(save_backbone(loaded, tmp_path / "again"))
    assert again.normalization == loaded.normalization


def test_torchvision_resnet_round_trip(tmp_path):
    m = randomise(build_backbone("resnet18", input_size=64, stem="imagenet"), 4)
    loaded = load_backbone(save_backbone(m, tmp_path))
    assert loaded.spec == m.spec and all(torch.equal(v, loaded.state_dict()[k]) for k, v in m.state_dict().items())


def test_plain_safetensors_file_with_prefix(tmp_path):
    from safetensors.torch import save_file

    ref = randomise(build_backbone("resnet18", input_size=32, stem="cifar"), 6)
    path = tmp_path / "encoder.safetensors"
    save_file({f"encoder.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    m = load_backbone(path, arch="resnet18", stem="cifar", input_size=32)
    assert m.load_report.prefix == "encoder." and m.load_report.ok
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "with_args.pth.tar"
    ckpt, _ = _moco_checkpoint()
    ckpt["args"] = argparse.Namespace(lr=0.03)  # what some training scripts store
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match="weights-only"):
        read_state_dict(path)


def test_imagenet_stem_weights_into_cifar_stem_report_the_mismatch(tmp_path):
    ckpt, _ = _moco_checkpoint(stem="imagenet")
    path = tmp_path / "moco.pth.tar"
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match="shape mismatch"):
        m = load_backbone(path, arch="resnet18", stem="cifar", input_size=32)
    assert [s.split(":")[0] for s in m.load_report.shape_mismatch] == ["conv1.weight"]
    assert m.load_report.missing == ["conv1.weight"]
    with pytest.raises(WeightsError, match="conv1.weight"):
        load_backbone(path, arch="resnet18", stem="cifar", input_size=32, strict=True)


def test_unrelated_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.fc.weight": torch.randn(3, 3)}}, path)
    with pytest.raises(WeightsError, match="architecture"):
        load_backbone(path)
    with pytest.raises(WeightsError, match="no tensor"):
        load_backbone(path, arch="resnet18")
    with pytest.raises(WeightsError, match="not found"):
        load_backbone(tmp_path / "missing.pth")


def test_infer_arch_distinguishes_resnets():
    for arch, stem in (("resnet18", "cifar"), ("resnet34", "imagenet"), ("resnet50", "cifar")):
        with torch.device("meta"):  # only names and shapes matter; skips ResNet-50's init cost
            sd = build_backbone(arch, input_size=32 if stem == "cifar" else 224, stem=stem).state_dict()
        assert infer_resnet_arch({f"module.encoder_q.{k}": v for k, v in sd.items()}) == (arch, stem)


def test_torchvision_weights_offline_error_names_url_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        load_backbone("torchvision", arch="resnet18")
    msg = str(info.value)
    assert "https://download.pytorch.org/models/resnet18" in msg and str(tmp_path) in msg


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ref = randomise(torchvision.models.resnet18(), 7)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's fc is reported as unused, not warned about
        m = load_backbone("torchvision:IMAGENET1K_V1", arch="resnet18")
    assert m.spec["stem"] == "imagenet" and m.load_report.unexpected == ["fc.bias", "fc.weight"]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    assert m.normalization["std"] == pytest.approx([0.229, 0.224, 0.225])
    with pytest.raises(Exception, match="arch"):
        load_backbone("torchvision")
