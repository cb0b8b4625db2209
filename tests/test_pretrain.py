"""MoCo-v2 pretraining: loss and update rules, bit-for-bit resume, 2-process gloo DDP, and
features that beat random initialisation on real data (sklearn digits)."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import calibclust.pretrain as P  # noqa: E402
from calibclust.datasets import digits_images, make_digits_folder  # noqa: E402
from calibclust.errors import InputError  # noqa: E402
from calibclust.models.weights import load_backbone  # noqa: E402


# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_images(32)


def tiny_config(**kw):
    base = dict(
        backbone="small", width=8, input_size=32, proj_hidden_dim=64, proj_dim=32, queue_size=64,
        epochs=3, batch_size=32, lr=0.1, device="cpu",
    )
    base.update(kw)
    return P.MoCoConfig(**base)


def test_info_nce_matches_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    tau = 0.2
    loss = P.info_nce(q, k, queue, tau)
    qn, kn, Q = q.double().numpy(), k.double().numpy(), queue.double().numpy()
    ref = []
    for i in range(6):  # SPICE Eq. (1), written out per sample
        pos = math.exp(qn[i] @ kn[i] / tau)
        neg = sum(math.exp(qn[i] @ Q[j] / tau) for j in range(20))
        ref.append(-math.log(pos / (pos + neg)))
    assert float(loss) == pytest.approx(np.mean(ref), rel=1e-5)


def test_momentum_update_and_queue_ring_buffer():
    cfg = tiny_config(queue_size=40, momentum=0.9)
    moco = P._build_modules(cfg, n_images=100, world_batch=16)
    assert moco.queue.shape == (40, 32)  # min(queue_size 40, N - B = 84)
    assert P._build_modules(tiny_config(queue_size=4096), 100, 16).queue.shape[0] == 84  # capped by the data
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in moco.encoder_k.parameters()]
    q = [p.clone() for p in moco.encoder_q.parameters()]
    moco.momentum_update()
    for pk, b, pq in zip(moco.encoder_k.parameters(), before_k, q):
        assert torch.allclose(pk, 0.9 * b + 0.1 * pq, atol=1e-6)  # θ_k ← μ θ_k + (1 − μ) θ_q
    keys = [torch.full((16, 32), float(i)) for i in range(1, 4)]
    for key in keys:
        moco.enqueue(key)
    # 48 keys into 40 slots: the third batch wrapped around to the front.
    assert torch.all(moco.queue[:8] == 3) and torch.all(moco.queue[16:32] == 2) and torch.all(moco.queue[32:] == 3)
    assert torch.all(moco.queue[8:16] == 1) and int(moco.queue_ptr) == 8


def test_learning_rate_warmup_then_cosine():
    cfg = tiny_config(epochs=20, lr=0.4, batch_size=128)  # base 0.4 * 128/256 = 0.2, warm-up 1 epoch
    spe = 10
    lrs = [P.learning_rate(cfg, s, spe) for s in range(200)]
    assert lrs[0] == pytest.approx(0.2 / 10) and lrs[9] == pytest.approx(0.2)
    assert max(lrs) == pytest.approx(0.2) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_continues_bit_for_bit(digits, tmp_path):
    images = digits[0][:96]
    cfg = tiny_config(epochs=3)  # 3 steps per epoch
    full = P.pretrain(images, cfg, tmp_path / "full", progress=False)
    assert len(full.step_losses) == 9 and all(math.isfinite(v) for v in full.step_losses)
    first = P.pretrain(images, cfg, tmp_path / "split", stop_after_epochs=1, progress=False)
    assert first.step_losses == full.step_losses[:3]
    assert P.read_state(tmp_path / "split")["global_step"] == 3
    rest = P.pretrain(images, cfg, tmp_path / "split", resume=True, progress=False)
    assert rest.first_step == 3
    assert rest.step_losses == full.step_losses[3:], (rest.step_losses, full.step_losses[3:])
    assert _same_weights(rest.backbone, full.backbone)
    assert [h["epoch"] for h in rest.history] == [1, 2, 3]
    assert _same_weights(load_backbone(tmp_path / "split"), full.backbone)
    assert len(list((tmp_path / "split" / "checkpoint").glob("*.safetensors"))) == 1  # old states removed


def test_interrupt_mid_epoch_saves_a_resumable_state(digits, tmp_path, monkeypatch):
    images = digits[0][:96]
    cfg = tiny_config(epochs=2)
    full = P.pretrain(images, cfg, tmp_path / "full", progress=False)
    calls = {"n": 0}
    real = P.info_nce

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during the second step (mid-epoch 1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "info_nce", interrupting)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain(images, cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(P, "info_nce", real)
    assert P.read_state(tmp_path / "cut")["global_step"] == 2  # the step in flight was finished
    rest = P.pretrain(images, cfg, tmp_path / "cut", resume=True, progress=False)
    assert rest.step_losses == full.step_losses[2:]
    assert _same_weights(rest.backbone, full.backbone)


def test_resume_refuses_other_settings_and_fresh_run_refuses_existing_dir(digits, tmp_path):
    images = digits[0][:64]
    cfg = tiny_config(epochs=2)
    P.pretrain(images, cfg, tmp_path, stop_after_epochs=1, progress=False)
    with pytest.raises(InputError, match="lr"):
        P.pretrain(images, tiny_config(epochs=2, lr=0.2), tmp_path, resume=True, progress=False)
    with pytest.raises(InputError, match="--resume"):
        P.pretrain(images, cfg, tmp_path, progress=False)
    with pytest.raises(Exception, match="64 images"):
        P.pretrain(digits[0][:96], cfg, tmp_path, resume=True, progress=False)


def test_cli_builds_config_from_defaults_and_options():
    parser = argparse.ArgumentParser(prog="calibclust")
    P.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "imgs", "--out", "o", "--backbone", "small", "--epochs", "7", "--blur", "on", "--no-amp"])
    cfg = P.config_from_args(args)
    assert cfg.backbone == "small" and cfg.epochs == 7 and cfg.augment.blur == "on" and cfg.amp is False
    assert cfg.temperature == 0.2 and cfg.momentum == 0.99 and cfg.queue_size == 32768  # paper defaults
    saved = P.MoCoConfig(backbone="resnet18", epochs=50, lr=0.06)
    resumed = P.config_from_args(parser.parse_args(["pretrain", "imgs", "--out", "o", "--resume"]), base=saved)
    assert resumed == saved
    assert P.MoCoConfig.from_dict(saved.to_dict()) == saved
    with pytest.raises(ValueError, match="unknown"):
        P.MoCoConfig.from_dict({"epochz": 3})


def test_two_process_gloo_run(tmp_path):
    folder = make_digits_folder(tmp_path / "digits", limit=80)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "calibclust.pretrain", str(folder), "--out", str(out),
        "--backbone", "small", "--width", "8", "--proj-hidden-dim", "64", "--proj-dim", "32",
        "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = P.read_state(out)
    assert state["world_size"] == 2 and state["batch_size"] == 32
    assert state["global_step"] == 2 * (80 // 32)
    assert all(math.isfinite(h["loss"]) for h in state["history"]) and len(state["history"]) == 2
    backbone = load_backbone(out)
    assert backbone.spec["name"] == "small"
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def _kmeans_acc(backbone, images, labels):
    from calibclust.augment import preprocess
    from calibclust.cluster.kmeans import kmeans
    from calibclust.metrics import hungarian_accuracy

    backbone.eval()
    with torch.no_grad():
        feats = torch.cat([backbone(preprocess(torch.from_numpy(images[i : i + 512]))) for i in range(0, len(images), 512)])
    feats = torch.nn.functional.normalize(feats, dim=1)
    return hungarian_accuracy(labels, kmeans(feats, 10, n_init=5, seed=0).labels.numpy()).accuracy


def _pretrain_vs_random(digits, tmp_path, epochs, batch_size):
    from calibclust.models.backbones import build_backbone

    images, labels = digits
    cfg = P.MoCoConfig(
        backbone="small", input_size=32, epochs=epochs, batch_size=batch_size, lr=0.06,
        proj_hidden_dim=512, proj_dim=128, device="cpu", seed=0,
    )
    torch.manual_seed(cfg.seed)  # the same initial weights pretrain() starts from
    random_acc = _kmeans_acc(build_backbone("small", input_size=32), images, labels)
    result = P.pretrain(images, cfg, tmp_path, progress=False)
    return random_acc, _kmeans_acc(result.backbone, images, labels)


def test_short_moco_beats_random_init_on_digits(digits, tmp_path):
    # Fast variant: 4 epochs x 28 steps of the small backbone (~30 s on one busy core).
    random_acc, moco_acc = _pretrain_vs_random(digits, tmp_path, epochs=4, batch_size=64)
    assert moco_acc > random_acc + 0.10, f"K-means ACC on digits: MoCo-v2 (4 epochs) {moco_acc:.3f} vs random init {random_acc:.3f}"


@pytest.mark.slow
def test_moco_beats_random_init_on_digits_by_a_wide_margin(digits, tmp_path):
    # 30 epochs x 14 steps (3-5 min on one busy core): the loss is well into its decrease.
    random_acc, moco_acc = _pretrain_vs_random(digits, tmp_path, epochs=30, batch_size=128)
    assert moco_acc > random_acc + 0.25, f"K-means ACC on digits: MoCo-v2 (30 epochs) {moco_acc:.3f} vs random init {random_acc:.3f}"


def test_resolve_device_gives_cuda_an_index_and_refuses_clearly(monkeypatch):
    """A bare ``--device cuda`` crashed in torch.cuda.set_device on an H100 machine (it wants an
    index); unknown names and CUDA without a GPU are InputErrors, not torch tracebacks."""
    from calibclust.errors import InputError
    from calibclust.device import resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)  # as under torchrun it may be set
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device foo"):
        resolve_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU is usable"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(InputError, match="has 4 CUDA device"):
        resolve_device("cuda:4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)


class _Received(torch.nn.Identity):
    """An inner backbone that returns what it is given."""
    feature_dim, spec = 0, {"name": "received", "input_size": 32}


def test_gradient_input_filter_sees_edges_not_colours_and_travels_with_the_weights(digits, tmp_path):
    """``--input-filter gradient``: the backbone's output is the same for a shape in any ink/paper
    colour pair, either polarity and any contrast, and the filter is part of the saved backbone."""
    from calibclust.models.backbones import GradientInput, backbone_label, build_backbone, with_input_filter

    backbone = with_input_filter(build_backbone("small", width=8), "gradient").eval()
    shape = torch.zeros(1, 1, 32, 32)
    shape[..., 8:24, 12:16] = 1.0
    shape[..., 8:12, 12:24] = 1.0

    def painted(ink, paper):
        return shape * torch.tensor(ink).view(1, 3, 1, 1) + (1 - shape) * torch.tensor(paper).view(1, 3, 1, 1)

    with torch.no_grad():
        reference = backbone(painted([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]))
        for ink, paper in [([0.9, 0.1, 0.1], [0.1, 0.1, 0.8]), ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]), ([0.6, 0.6, 0.6], [0.4, 0.4, 0.4])]:
            torch.testing.assert_close(backbone(painted(ink, paper)), reference, atol=1e-5, rtol=1e-4)
        plain = with_input_filter(build_backbone("small", width=8), "none").eval()
        plain.load_state_dict(backbone.inner.state_dict())
        assert not torch.allclose(plain(painted([0.9, 0.1, 0.1], [0.1, 0.1, 0.8])), plain(painted([1.0] * 3, [0.0] * 3)), atol=1e-3)
        # What the inner backbone receives: edges at full strength; a flat image is no edge at all,
        # not its noise scaled up to full strength.
        seen = GradientInput(_Received())
        edges = seen(painted([0.9, 0.1, 0.1], [0.1, 0.1, 0.8]))
        assert edges.shape == (1, 3, 32, 32) and float(edges.amax()) == pytest.approx(1.0) and float(edges[0, :, 0, 0].max()) < 1e-5
        assert float(seen(torch.full((1, 3, 32, 32), 0.5) + 1e-4 * torch.randn(1, 3, 32, 32)).amax()) < 0.1
    assert backbone_label(backbone) == "small+gradient"
    with pytest.raises(ValueError, match="input filter must be one of"):
        with_input_filter(plain, "sobel")

    cfg = tiny_config(epochs=1, input_filter="gradient")
    result = P.pretrain(digits[0][:64], cfg, tmp_path / "run", progress=False)
    loaded = load_backbone(tmp_path / "run")
    assert backbone_label(loaded) == "small+gradient" and json.loads((tmp_path / "run" / "config.json").read_text())["config"]["input_filter"] == "gradient"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.backbone.eval()(x))
    with pytest.raises(ValueError, match=r"input_filter must be one of \('none', 'gradient'\), got 'sobel'"):
        P.MoCoConfig(input_filter="sobel")
