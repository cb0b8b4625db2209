"""``--engine ray`` on a local Ray instance with 2 CPUs gives the local engine's results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_contract_model, write_bad_images, write_good_images  # noqa: E402

from calibclust.io.predictions import read_predictions  # noqa: E402
from calibclust.serve.pipeline import LabelOptions, label_folder  # noqa: E402
from calibclust.serve.policy import Policy  # noqa: E402

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'calibclust[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: this test starts its own local 2-CPU instance")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_equals_local_engine(local_ray, tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 300, seed=11, subdirs=3)
    write_good_images(folder / "jpg", 40, seed=12, fmt="jpg")
    bad = write_bad_images(folder / "bad")
    model = make_contract_model(tmp_path / "model.onnx")
    common = dict(folder=str(folder), model=str(model), batch_size=32, top_k=2, write_probs=True, write_embeddings=True,
                  max_pixels=30_000, policy=Policy("target_accuracy", 0.6), progress=False, table_format="parquet")
    local = label_folder(LabelOptions(out_dir=str(tmp_path / "local"), workers=1, **common))
    remote = label_folder(LabelOptions(out_dir=str(tmp_path / "ray"), engine="ray", ray_actors=2, **common))
    assert remote.exit_code == local.exit_code == 3
    a, b = read_predictions(local.table), read_predictions(remote.table)
    assert set(a) == set(b)
    for col in a:
        if a[col].dtype.kind == "f":
            np.testing.assert_allclose(b[col], a[col], atol=1e-6, equal_nan=True, err_msg=col)
        else:
            assert b[col].tolist() == a[col].tolist(), col
    assert len(a["path"]) == 345 and (a["decision"] == "error").sum() == len(bad)
    s_local = json.loads((tmp_path / "local" / "summary.json").read_text())
    s_ray = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert s_ray["engine"] == "ray" and s_ray["counts"] == s_local["counts"]
    assert s_ray["thresholds"]["confidence_threshold"] == pytest.approx(s_local["thresholds"]["confidence_threshold"])
    assert not (tmp_path / "ray" / ".calibclust-label").exists()
    np.testing.assert_allclose(np.load(tmp_path / "ray" / "embeddings.npy"), np.load(tmp_path / "local" / "embeddings.npy"),
                               atol=1e-6, equal_nan=True)
