"""The on-disk image cache (calibclust.io.cache): the same pixels as decoding into memory, numpy's
indexing, built once and reused, rebuilt when the folder changes, resumed after an interruption, and
training from it gives the same model as training from memory."""

from __future__ import annotations

import numpy as np
import pytest

from calibclust.datasets import make_mixed_size_folder
from calibclust.errors import InputError
from calibclust.io.cache import INDEX_FILE, build_image_cache
from calibclust.train.data import TrainingData


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_mixed_size_folder(tmp_path_factory.mktemp("cache") / "imgs", classes=3, per_class=12, seed=0)


def test_cache_holds_the_pixels_paths_and_labels_of_the_in_memory_decode(folder, tmp_path):
    memory = TrainingData.from_folder(folder, 24, progress=False, resize="center-crop")
    cached = TrainingData.from_folder(folder, 24, progress=False, resize="center-crop", cache_dir=tmp_path / "c")
    assert type(cached.images).__name__ == "CachedImages" and cached.images.shape == memory.images.shape == (36, 24, 24, 3)
    assert cached.paths == memory.paths and np.array_equal(cached.labels, memory.labels)
    assert sorted(p for p, _ in cached.unreadable) == sorted(p for p, _ in memory.unreadable) and len(cached.unreadable) == 3
    assert np.array_equal(np.asarray(cached.images), memory.images)
    x, m = cached.images, memory.images
    idx = np.array([7, 2, 2, 35, 0, 8, 9])  # unsorted, repeated, runs
    assert np.array_equal(x[idx], m[idx]) and np.array_equal(x[3], m[3]) and np.array_equal(x[5:17], m[5:17])
    mask = np.arange(36) % 4 == 1
    assert np.array_equal(x[mask], m[mask]) and x[np.array([], int)].shape == x[[]].shape == (0, 24, 24, 3)
    assert np.array_equal(x[-1], m[-1]) and np.array_equal(x[30:4:-3], m[30:4:-3])
    sub = cached.subset(mask)
    assert type(sub.images).__name__ == "CachedImages" and np.array_equal(np.asarray(sub.images), m[mask])
    assert np.array_equal(sub.images[[2, 0]], m[mask][[2, 0]])

    from calibclust.train.features import images_digest

    assert images_digest(x, chunk=5) == images_digest(m), "one digest for the same pixels wherever they live"
    assert x.pixels_digest == images_digest(m) and sub.images.pixels_digest is None  # kept per view, not shared


def test_cache_is_reused_rebuilt_when_the_folder_changes_and_resumed(folder, tmp_path, monkeypatch):
    import calibclust.io.images as images_module

    first = build_image_cache(folder, tmp_path / "c", 16, progress=False)
    stamp = first.images.path.stat().st_mtime_ns
    again = build_image_cache(folder, tmp_path / "c", 16, progress=False)
    assert not first.reused and again.reused and first.images.path.stat().st_mtime_ns == stamp
    # the same folder spelled another way (absolute, or moved): the same cache, the same unreadable files
    absolute = build_image_cache(folder.resolve(), tmp_path / "c", 16, progress=False)
    assert absolute.reused and len(absolute.unreadable) == 3 and len(absolute.paths) == 36
    letterbox = build_image_cache(folder, tmp_path / "c", 16, resize="letterbox", progress=False)
    assert not letterbox.reused and not first.images.path.exists()
    with pytest.raises(InputError, match="the cache was rebuilt or deleted"):  # never other pixels
        first.images[0]

    # Interrupted after the first chunk of 10 files: the next call decodes only the rest.
    real, calls, interrupt = images_module.load_images, [], [True]

    def interrupted(paths, *args, **kwargs):
        calls.append(len(paths))
        if len(calls) == 2 and interrupt and interrupt.pop():
            raise KeyboardInterrupt
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(images_module, "load_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(folder, tmp_path / "r", 16, progress=False, chunk=10)
    assert '"rows_done": 10' in (tmp_path / "r" / INDEX_FILE).read_text()
    calls.clear()
    resumed = build_image_cache(folder, tmp_path / "r", 16, progress=False, chunk=10)
    assert sum(calls) == 39 - 10, calls  # 36 images + 3 unreadable files, the first 10 not decoded again
    memory = TrainingData.from_folder(folder, 16, progress=False)
    assert np.array_equal(np.asarray(resumed.images), memory.images) and resumed.paths == memory.paths

    (folder / "1" / "extra.png").write_bytes((folder / "0" / "notes.png").read_bytes())  # one more (bad) file
    changed = build_image_cache(folder, tmp_path / "c", 16, progress=False)
    assert not changed.reused and len(changed.unreadable) == 4
    (folder / "1" / "extra.png").unlink()


def test_pretraining_from_the_cache_equals_pretraining_from_memory(folder, tmp_path):
    import torch

    from calibclust.pretrain import MoCoConfig, pretrain

    memory = TrainingData.from_folder(folder, 16, progress=False)
    cached = TrainingData.from_folder(folder, 16, progress=False, cache_dir=tmp_path / "c")
    config = MoCoConfig(backbone="small", input_size=16, epochs=2, batch_size=8, proj_hidden_dim=16, proj_dim=8,
                        queue_size=16, amp=False)
    a = pretrain(memory.images, config, tmp_path / "a", progress=False).backbone.state_dict()
    b = pretrain(cached.images, config, tmp_path / "b", progress=False).backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_data_prints_one_row_per_size_and_mode(tmp_path, capsys):
    """`calibclust bench data` at toy sizes: each row measured in its own process, peak RSS per stage."""
    from calibclust.cli import main

    rc = main(["bench", "data", "--sizes", "130,260", "--image-size", "16", "--steps", "2", "--batch-size", "64",
               "--threads", "1", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["130"], ["260"])]
    assert [r[:2] for r in rows] == [["130", "cache"], ["130", "memory"], ["260", "cache"], ["260", "memory"]], out
    assert all(float(v) > 0 for r in rows for v in r[2:8]), out
    assert "cache: peak RSS at 260 images / at 130 images" in out
