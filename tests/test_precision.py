"""calibclust.precision: which autocast training gets, detected both ways."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calibclust.precision import cpu_bf16_supported, training_precision  # noqa: E402


def test_cpu_with_native_bf16_gets_bf16_and_channels_last():
    p = training_precision(torch.device("cpu"), cpu_bf16=True)
    assert p.enabled and p.dtype == torch.bfloat16 and p.channels_last and not p.grad_scaler
    assert "bf16" in p.label
    with p.autocast(torch.device("cpu")):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16


def test_cpu_without_native_bf16_stays_fp32_and_says_why():
    p = training_precision(torch.device("cpu"), cpu_bf16=False)
    assert not p.enabled and not p.channels_last and "no native bf16" in p.label
    with p.autocast(torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32


def test_detection_follows_the_cpu_features(monkeypatch):
    """Native = AVX-512 BF16 or AMX; an AVX-512 CPU without either (bf16 emulated) stays on fp32."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN (mkldnn) CPU backend")
    for avx512_bf16, amx, native in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_bf16_supported() is native
        assert training_precision(torch.device("cpu")).enabled is native
    assert "off" in training_precision(torch.device("cpu"), amp=False).label


def test_pretrain_logs_and_records_its_precision(tmp_path, capsys):
    import json

    import numpy as np

    from calibclust.pretrain import MoCoConfig, pretrain

    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    config = MoCoConfig(backbone="small", width=8, input_size=16, proj_hidden_dim=16, proj_dim=8, queue_size=8,
                        epochs=1, batch_size=8, device="cpu")
    pretrain(images, config, tmp_path / "run", progress=False)
    expected = training_precision(torch.device("cpu")).label
    assert f"precision {expected}" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == expected


def test_backward_and_step_takes_the_same_step_with_and_without_a_loss_scaler():
    import torch

    from calibclust.precision import backward_and_step

    steps = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = torch.optim.SGD([w], lr=0.1)
        backward_and_step((w * torch.tensor([3.0, 4.0])).sum(), opt, scaler)
        steps.append(w.detach().clone())
    # d/dw = (3, 4): w − 0.1 · (3, 4), the scale divided out again before the step.
    torch.testing.assert_close(steps[0], torch.tensor([0.7, -2.4]))
    torch.testing.assert_close(steps[1], steps[0])
