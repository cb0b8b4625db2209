"""Backbone features of the un-augmented images and of V weak + V strong views per image,
computed once and cached on disk — what frozen-backbone training (``--freeze-backbone``) runs on.

With the backbone frozen, CDC's heads only ever see f(x), f(𝒲(x)) and f(𝒜(x)) (Algorithm 1 of
"Towards Calibrated Deep Clustering Network"), so precomputing ``views`` augmented copies of each image and drawing one of
them per sample and step turns an epoch into a few small matrix products. The cache is a single
safetensors file (``plain`` (N, D) float32, ``weak`` / ``strong`` (V, N, D)) whose metadata records
what it was computed from (backbone weights digest, image digest, number of views, seed, view
settings); a cache that does not match is recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibclust.augment.views import ViewConfig, strong_view, weak_view

CACHE_FORMAT = "calibclust-feature-cache/1"


@dataclass
class FeatureCache:
    plain: torch.Tensor  # (N, D) features of the un-augmented images
    weak: torch.Tensor  # (V, N, D) features of V weak views
    strong: torch.Tensor  # (V, N, D) features of V strong views

    @property
    def num_views(self) -> int:
        return int(self.weak.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.plain.shape[0])

    def to(self, device) -> "FeatureCache":
        return FeatureCache(self.plain.to(device), self.weak.to(device), self.strong.to(device))

    def sample(self, kind: str, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Features of one randomly chosen cached view per index: (len(idx), D) float32."""
        bank = {"weak": self.weak, "strong": self.strong}[kind]
        v = torch.randint(0, bank.shape[0], (idx.numel(),), generator=g).to(bank.device)
        return bank[v, idx.to(bank.device)].float()


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def features_digest(features: torch.Tensor) -> str:
    """Identity of precomputed feature rows (``--features``), checked when a run resumes."""
    return images_digest(features.detach().cpu().numpy())


def images_digest(images: np.ndarray, chunk: int = 4096) -> str:
    """Digest of uint8 images, in chunks (the same value for an in-memory array and an on-disk cache
    of the same pixels, and no full copy of either). An on-disk cache's views are read-only, so their
    digest is kept on the view: CDC's checkpoint of every epoch does not read the whole cache again."""
    from calibclust.io.cache import CachedImages

    cached = isinstance(images, CachedImages)
    if cached and images.pixels_digest is not None:
        return images.pixels_digest
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    for start in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[start : start + chunk]).tobytes())
    digest = h.hexdigest()[:32]
    if cached:
        images.pixels_digest = digest
    return digest


def module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def recalibrate_batchnorm(
    backbone: nn.Module, preprocess, images: np.ndarray, batch_size: int = 256, device: str = "cpu"
) -> int:
    """Re-estimate every BatchNorm's running mean/var on the un-augmented images (cumulative
    average over all of them), leaving weights untouched; returns the number of BN layers.

    A randomly initialised backbone has running stats (0, 1) that do not describe its activations,
    so its eval-mode features are nearly degenerate (on digits, K-means ACC ≈ 28% instead of ≈ 58%
    with data statistics). Estimating them from the unlabeled training images is label-free.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    backbone.train()
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        backbone(preprocess(x))
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    backbone.eval()
    return len(bns)


@torch.no_grad()
def compute_feature_cache(
    embed,
    preprocess,
    images: np.ndarray,
    num_views: int,
    seed: int,
    view_config: ViewConfig | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    store_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> FeatureCache:
    """Features of ``images`` (N, H, W, 3) uint8 and of ``num_views`` weak and strong views of each.

    ``embed`` maps a preprocessed batch to (n, D) features (call it in eval mode).
    View v of image i depends only on (seed, v, chunk of i), so results are reproducible.
    """
    from tqdm.auto import tqdm

    view_config = view_config or ViewConfig()
    n = len(images)
    plain = weak = strong = None
    chunks = list(range(0, n, batch_size))
    bar = tqdm(total=len(chunks) * (1 + 2 * num_views), desc="caching view features", unit="batch", disable=not progress)
    for c, start in enumerate(chunks):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        z = embed(preprocess(x)).float()
        if plain is None:
            d = z.shape[1]
            plain = torch.empty(n, d)
            weak = torch.empty(num_views, n, d, dtype=store_dtype)
            strong = torch.empty(num_views, n, d, dtype=store_dtype)
        plain[start : start + len(x)] = z.cpu()
        bar.update(1)
        for v in range(num_views):
            g = torch.Generator().manual_seed(derive_seed(seed, "views", v, c))
            weak[v, start : start + len(x)] = embed(preprocess(weak_view(x, g, view_config))).cpu().to(store_dtype)
            strong[v, start : start + len(x)] = embed(preprocess(strong_view(x, g, view_config))).cpu().to(store_dtype)
            bar.update(2)
    bar.close()
    return FeatureCache(plain, weak, strong)


def cache_key(backbone_digest: str, image_digest: str, num_views: int, seed: int, view_config: ViewConfig, store_dtype: str) -> dict:
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone_digest,
        "images": image_digest,
        "num_views": str(num_views),
        "seed": str(seed),
        "views": json.dumps(asdict(view_config), sort_keys=True),
        "dtype": store_dtype,
    }


def save_feature_cache(cache: FeatureCache, path: str | os.PathLike, key: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"plain": cache.plain.contiguous(), "weak": cache.weak.contiguous(), "strong": cache.strong.contiguous()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in key.items()})
    os.replace(tmp, path)
    return path


def load_feature_cache(path: str | os.PathLike, key: dict) -> FeatureCache | None:
    """The cache at ``path`` if it exists and was computed from exactly ``key``; else None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if any(meta.get(k) != str(v) for k, v in key.items()):
                return None
            return FeatureCache(fh.get_tensor("plain"), fh.get_tensor("weak"), fh.get_tensor("strong"))
    except Exception:  # a truncated or foreign file is recomputed, not trusted
        return None


# --- precomputed features (train cdc / train spice --features) --------------------------------------
def features_file_list(path: Path) -> Path:
    """``FILE.files.txt`` of a features file, both checked to exist (an InputError otherwise)."""
    from calibclust.errors import InputError

    files = path.with_name(path.stem + ".files.txt")
    if not path.is_file():
        raise InputError(f"--features {path}: no such file")
    if not files.is_file():
        raise InputError(f"--features {path}: its file list {files.name} is missing (one image path per row, relative "
                         "to the image folder, as 'calibclust embed' writes it)")
    return files


def read_precomputed_features(path: str | os.PathLike, paths: list[str]) -> tuple[torch.Tensor, dict]:
    """Rows of ``path`` (an (N, D) ``.npy``, e.g. ``calibclust embed``'s output) in the order of
    ``paths`` (the training images, relative to their folder), and its description.

    The rows are matched to images through ``FILE.files.txt`` (one path per row, relative to the
    folder, as ``embed`` writes it); ``FILE.json``, when present, says which backbone made them. An
    image without a row, or a file list that does not fit the array, is an error."""
    from calibclust.errors import InputError

    path = Path(path)
    files = features_file_list(path)
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise InputError(f"--features {path}: not a .npy array ({exc})") from None
    names = files.read_text(encoding="utf-8").split("\n")
    names = names[:-1] if names and names[-1] == "" else names  # embed ends every line with \n; paths may hold other breaks
    if array.ndim != 2 or len(names) != array.shape[0]:
        raise InputError(f"--features {path}: expected an (N, D) array with one line of {files.name} per row, got "
                         f"shape {array.shape} and {len(names)} lines")
    row = {name: i for i, name in enumerate(names)}
    missing = [p for p in paths if p not in row]
    if missing:
        raise InputError(f"--features {path}: {len(missing)} of the {len(paths)} images have no row, e.g. {missing[0]!r} "
                         f"(rows are matched by their path in {files.name}, relative to the image folder)")
    features = torch.from_numpy(np.ascontiguousarray(array[[row[p] for p in paths]], dtype=np.float32))
    if not torch.isfinite(features).all():
        raise InputError(f"--features {path}: holds NaN or infinite values")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return features, meta


def match_backbone(backbone: nn.Module, preprocess, images: np.ndarray, features: torch.Tensor, device: str = "cpu",
                   sample: int = 64, seed: int = 0) -> nn.Module:
    """The backbone that gives ``features`` on ``images``: ``backbone`` itself, or it with its outputs
    L2-normalised when the features are (``embed``'s are); an InputError when neither matches on a
    seeded sample of images (features from another backbone, image size or normalisation)."""
    from calibclust.errors import InputError
    from calibclust.models.backbones import L2Normalized

    if features.shape[1] != backbone.feature_dim:
        raise InputError(f"--features have {features.shape[1]} dimensions but the backbone gives {backbone.feature_dim}: "
                         "give the --backbone-weights that computed them")
    rows = np.sort(np.random.default_rng(seed).choice(len(images), min(sample, len(images)), replace=False))
    backbone.eval().to(device)
    with torch.no_grad():
        z = backbone(preprocess(torch.from_numpy(images[rows]).to(device))).float().cpu()
    given = features[torch.from_numpy(rows)]
    cosine = float(torch.nn.functional.cosine_similarity(z, given, dim=1).min())
    if cosine < 0.99:
        raise InputError(f"--features do not come from this backbone on these images (lowest cosine similarity "
                         f"{cosine:.3f} on {len(rows)} images): give the --backbone-weights (and --image-size) that "
                         "computed them")
    unit = bool(torch.allclose(given.norm(dim=1), torch.ones(len(given)), atol=1e-3))
    return L2Normalized(backbone) if unit and not torch.allclose(z.norm(dim=1), torch.ones(len(z)), atol=1e-3) else backbone


def single_view_cache(features: torch.Tensor) -> FeatureCache:
    """Precomputed features carry no augmented views: the weak and strong view of every image is
    the image itself (one cached view)."""
    return FeatureCache(features, features[None], features[None])
