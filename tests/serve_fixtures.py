"""Contract-conforming ONNX models built with ``onnx.helper`` (no torch), and image folders for serve tests.

The model follows the model contract (calibclust/contract.py): input ``images`` uint8 [N, H, W, 3] (dynamic N) →
Cast → /255 → (x − mean)/std → a tiny fixed "model" → Softmax → ``probs``, ``confidence``
(ReduceMax), ``label`` (ArgMax, int64), ``ood_score`` and ``embedding``; the
:class:`~calibclust.metadata.ModelMetadata` JSON sits in ``metadata_props`` under "calibclust".

The tiny model is a nearest-colour classifier, so tests can predict its output by hand:
the image's mean colour m (per channel, in [0, 1]) is compared with one colour centre per cluster,
logits_c = −‖m − centre_c‖² / T in normalised space, which is affine in m (the ‖m‖² term is the
same for every class and cancels in the softmax) — one MatMul + Add. ``ood_score`` = 1 − confidence
(the max-softmax score of CDC appendix C.5). With ``conv_channels`` a few strided convolutions run
first (random fixed weights): the same contract, with enough compute to make benchmarks mean something.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from calibclust.metadata import ONNX_METADATA_KEY, ModelMetadata, OODSpec

# Pure red, green and blue: a flat image of colour k gets cluster k with high confidence.
DEFAULT_CENTRES = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_contract_model(
    path: str | Path,
    centres: Sequence[Sequence[float]] = DEFAULT_CENTRES,
    input_size: tuple[int, int] = (16, 16),
    temperature: float = 8.0,
    metadata: dict | None = None,
    ood_threshold: float | None = 0.6,
    calibrated: bool = True,
    conv_channels: Sequence[int] = (),
    with_metadata: bool = True,
    raw_metadata: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a contract model to ``path`` and return it.

    ``metadata`` overrides fields of the generated :class:`ModelMetadata`; ``raw_metadata``
    stores that string verbatim instead (for refusal tests); ``with_metadata=False`` stores none.
    """
    path = Path(path)
    centres = np.asarray(centres, dtype=np.float32)
    num_clusters = len(centres)
    height, width = input_size
    mean = np.asarray(MEAN, np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(STD, np.float32).reshape(1, 1, 1, 3)
    inits = [
        _init("c255", np.float32(255.0)),
        _init("mean", mean),
        _init("std", std),
        _init("one", np.float32(1.0)),
        _init("eps", np.float32(1e-12)),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x_f", "c255"], ["x_01"]),
        helper.make_node("Sub", ["x_01", "mean"], ["x_c"]),
        helper.make_node("Div", ["x_c", "std"], ["x_n"]),  # (N, H, W, 3) normalised
    ]
    rng = np.random.default_rng(seed)
    if conv_channels:
        nodes.append(helper.make_node("Transpose", ["x_n"], ["h0"], perm=[0, 3, 1, 2]))
        prev, c_in = "h0", 3
        for i, c_out in enumerate(conv_channels):
            w = rng.normal(0, np.sqrt(2.0 / (9 * c_in)), (c_out, c_in, 3, 3)).astype(np.float32)
            inits += [_init(f"conv{i}_w", w), _init(f"conv{i}_b", np.zeros(c_out, np.float32))]
            stride = 1 if i == 0 else 2
            nodes += [
                helper.make_node(
                    "Conv", [prev, f"conv{i}_w", f"conv{i}_b"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride, stride]
                ),
                helper.make_node("Relu", [f"c{i}"], [f"h{i + 1}"]),
            ]
            prev, c_in = f"h{i + 1}", c_out
        nodes += [
            helper.make_node("GlobalAveragePool", [prev], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["feat"], axis=1),  # (N, c_in)
        ]
        proj = rng.normal(0, 1.0 / np.sqrt(c_in), (c_in, num_clusters)).astype(np.float32)
        inits += [_init("W", proj), _init("b", np.zeros(num_clusters, np.float32))]
        feat_dim = c_in
    else:
        nodes.append(helper.make_node("ReduceMean", ["x_n"], ["feat"], axes=[1, 2], keepdims=0))  # (N, 3)
        # logits_c = (2 m·c − ‖c‖²) / T in normalised space (the −‖m‖²/T term cancels in softmax).
        c_norm = (centres - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
        inits += [
            _init("W", (2.0 * c_norm.T / temperature).astype(np.float32)),
            _init("b", (-(c_norm**2).sum(1) / temperature).astype(np.float32)),
        ]
        feat_dim = 3
    nodes += [
        helper.make_node("MatMul", ["feat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ReduceMax", ["probs"], ["confidence"], axes=[1], keepdims=0),
        helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
        helper.make_node("Sub", ["one", "confidence"], ["ood_score"]),
        helper.make_node("Mul", ["feat", "feat"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes1"], ["ss"], keepdims=1),
        helper.make_node("Sqrt", ["ss"], ["norm"]),
        helper.make_node("Max", ["norm", "eps"], ["norm_eps"]),
        helper.make_node("Div", ["feat", "norm_eps"], ["embedding"]),
    ]
    inits.append(_init("axes1", np.array([1], np.int64)))
    graph = helper.make_graph(
        nodes,
        "calibclust_fixture",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", height, width, 3])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num_clusters]),
            helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", feat_dim]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="calibclust-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    if raw_metadata is not None:
        helper.set_model_props(model, {ONNX_METADATA_KEY: raw_metadata})
    elif with_metadata:
        fields = dict(
            num_clusters=num_clusters,
            input_size=input_size,
            mean=MEAN,
            std=STD,
            method="cdc",
            calibrated=calibrated,
            embedding_dim=feat_dim,
            ood=OODSpec(score="msp", threshold=ood_threshold),
            confidence_threshold=0.5,
            train_stats={"mean_confidence": 0.9, "n_images": 100},
            weights_digest="sha256:fixture",
        )
        fields.update(metadata or {})
        helper.set_model_props(model, {ONNX_METADATA_KEY: ModelMetadata(**fields).to_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def colour_image(rgb: Sequence[float], size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A flat (H, W, 3) uint8 image of colour ``rgb`` in [0, 1]."""
    value = np.clip(np.rint(np.asarray(rgb, np.float64) * 255), 0, 255).astype(np.uint8)
    return np.broadcast_to(value, (*size, 3)).copy()


def expected_probs(images: np.ndarray, centres=DEFAULT_CENTRES, temperature: float = 8.0) -> np.ndarray:
    """What the colour model computes, written independently in numpy (float64)."""
    m = images.astype(np.float64).mean(axis=(1, 2)) / 255.0
    m_n = (m - np.asarray(MEAN)) / np.asarray(STD)
    c_n = (np.asarray(centres, np.float64) - np.asarray(MEAN)) / np.asarray(STD)
    logits = -((m_n[:, None, :] - c_n[None]) ** 2).sum(-1) / temperature
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def write_good_images(root: Path, n: int, size: int = 16, seed: int = 0, subdirs: int = 1, fmt: str = "png") -> list[Path]:
    """``n`` readable images of random mixed colours spread over ``subdirs`` sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / f"d{i % subdirs}" if subdirs > 1 else root
        folder.mkdir(parents=True, exist_ok=True)
        rgb = rng.random(3)
        img = colour_image(rgb, (size, size))
        img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.{fmt}"
        Image.fromarray(img).save(path, quality=95) if fmt == "jpg" else Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def write_bad_images(root: Path) -> dict[str, str]:
    """One file of every bad kind the foundation's decoder reports; returns {file name: reason keyword}.

    The bomb is a 200×200 PNG, refused by a run whose ``max_pixels`` is below 40,000.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    (root / "empty.png").write_bytes(b"")
    buf = root / "full.png"
    Image.fromarray(np.full((64, 64, 3), 77, np.uint8)).save(buf)
    data = buf.read_bytes()
    buf.unlink()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    jpeg = root / "full.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    data = jpeg.read_bytes()
    jpeg.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(root / "bomb.png")
    return {
        "not_an_image.jpg": "not an image",
        "empty.png": "not an image",
        "truncated.png": "unreadable",
        "truncated.jpg": "unreadable",
        "bomb.png": "exceeds the limit",
    }


def read_metadata_json(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    return json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])


def run_label_cli(*args: str, env: dict | None = None, timeout: float = 120):
    """``calibclust label ARGS`` in a subprocess, through the real ``calibclust`` command (the
    ``label`` subcommand comes from the static command table of ``calibclust.cli``)."""
    import os
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "calibclust", "label", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def rows_done(out: Path) -> int:
    """Rows committed to the journal of a labelling run writing to ``out``."""
    try:
        names = os.listdir(out / ".calibclust-label" / "parts")
    except FileNotFoundError:  # not created yet, or removed by a run that just finished
        return 0
    ends = [int(m.group(1)) for name in names if (m := re.match(r"part-\d{12}-(\d{12})\.npz$", name))]
    return max(ends, default=0)


def interrupt_at(proc, out: Path, rows: int, sig: int, timeout: float = 120) -> bool:
    """Send ``sig`` once at least ``rows`` results are committed (0 = as soon as the run started).
    Returns False if the process finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if (out / ".calibclust-label" / "job.json").exists() and rows_done(out) >= rows:
            proc.send_signal(sig)
            proc.wait(timeout=60)
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("run did not progress")
