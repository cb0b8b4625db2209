"""The clustering model every method trains, exports and evaluates through one small surface.

``ClusteringModel`` = backbone f(θ) + named heads g(θ_head). CDC has a ``clustering`` and a
``calibration`` head and predicts with the calibration one ("Towards Calibrated Deep Clustering Network" §3.4, "Final
Prediction"); SPICE keeps one ``clustering`` head; the K-means baseline's one head holds its centres
(``head_kind="prototype"``). Training engine, export and evaluation only use:

* ``preprocess(uint8 NHWC)`` → normalised float NCHW (the exact ops the ONNX graph fuses),
* ``embed(x)`` → backbone features (N, D),
* ``head_logits(z, head)`` / ``cluster_logits(x)`` → (N, C) logits of one head / the predicting head,
* ``num_clusters``, ``predict_head``, ``head_names``.

Inference checkpoints are a directory with ``model.safetensors`` and ``config.json``
(``{"format", "architecture", "metadata"}``, metadata = :class:`calibclust.metadata.ModelMetadata`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calibclust.errors import CalibclustError
from calibclust.metadata import ModelMetadata, digest_arrays
from calibclust.models.backbones import backbone_from_spec, backbone_spec

CHECKPOINT_FORMAT = "calibclust-model/1"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class MLPHead(nn.Module):
    """D → H → BN → ReLU → C (CDC §3.3 and Tab. 6, H = 512 by default); ``batch_norm=False``
    drops the BN, as SPICE's authors' head (D → 512 → ReLU → K) has none."""

    def __init__(self, in_dim: int, hidden_dim: int, num_clusters: int, batch_norm: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, num_clusters)

    def hidden(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, H)
        return torch.relu(self.bn(self.fc1(z)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, C)
        return self.fc2(self.hidden(z))


class PrototypeHead(nn.Module):
    """Cluster centres μ_k as a head: DEC's Student-t soft assignment q_k ∝ (1 + ‖ẑ − μ_k‖²)^-1
    ("Unsupervised Deep Embedding for Clustering Analysis", Eq. 1, α = 1) on L2-normalised features ẑ.
    ``forward`` returns log(1 + ‖ẑ − μ_k‖²)^-1, so its softmax is q exactly; plain matrix products,
    so the ONNX graph needs no distance op."""

    def __init__(self, in_dim: int, num_clusters: int):
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(num_clusters, in_dim))

    @classmethod
    def from_centers(cls, centers: torch.Tensor) -> "PrototypeHead":
        """A head holding ``centers`` (K, D), e.g. k-means centres of L2-normalised features."""
        head = cls(centers.shape[1], centers.shape[0]).to(centers.device)
        with torch.no_grad():
            head.centers.copy_(centers)
        return head

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, C)
        z = F.normalize(z, dim=1)
        sq_dist = (1.0 - 2.0 * z @ self.centers.T + (self.centers * self.centers).sum(1)).clamp_min(0.0)
        return -torch.log1p(sq_dist)


class MergedHead(nn.Module):
    """A head trained with more clusters than wanted, its clusters merged into groups
    (``fit --overcluster``, :func:`calibclust.cluster.merge.merge_groups`): a group's logit is the
    logsumexp of its members' logits, so the softmax is each group's summed member probabilities and
    logsumexp over the clusters (the energy OOD score) is unchanged. Max, exp, a 0/1 matrix product
    and log: plain ops for ONNX."""

    def __init__(self, head: nn.Module, groups: list[int]):
        super().__init__()
        groups = torch.as_tensor(groups, dtype=torch.long)
        n_groups = int(groups.max()) + 1
        if sorted(set(groups.tolist())) != list(range(n_groups)):
            raise ValueError(f"groups must number every group 0..{n_groups - 1} at least once, got {groups.tolist()}")
        self.head = head
        self.register_buffer("membership", F.one_hot(groups, n_groups).to(torch.float32))  # (trained K, K)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, K)
        logits = self.head(z)
        top = logits.amax(dim=1, keepdim=True)
        # A floor, not 0: a group whose members are all ~69 or more below the top gets a logit 69 below
        # it, not -inf (which would make the softmax and the ONNX graph's ops produce NaN downstream).
        return top + torch.log((torch.exp(logits - top) @ self.membership).clamp_min(1e-30))


HEAD_KINDS = ("mlp", "prototype")


class ClusteringModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_clusters: int,
        hidden_dim: int = 512,
        head_names: tuple[str, ...] = ("clustering", "calibration"),
        predict_head: str = "calibration",
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.25, 0.25, 0.25),
        head_batchnorm: bool = True,
        head_kind: str = "mlp",
        merged_groups: list[int] | None = None,
    ):
        """``merged_groups``: a model whose heads were trained with ``len(merged_groups)`` clusters and
        merged into ``num_clusters`` groups (:meth:`merge_clusters`), as it is rebuilt from a checkpoint."""
        super().__init__()
        if predict_head not in head_names:
            raise ValueError(f"predict_head {predict_head!r} is not one of the heads {head_names}")
        if head_kind not in HEAD_KINDS:
            raise ValueError(f"head_kind must be one of {HEAD_KINDS}, got {head_kind!r}")
        self.backbone = backbone
        self.num_clusters = int(num_clusters)
        self.hidden_dim = int(hidden_dim)
        self.head_names = tuple(head_names)
        self.predict_head = predict_head
        self.head_batchnorm = bool(head_batchnorm)
        self.head_kind = head_kind
        self.merged_groups: list[int] | None = None
        if merged_groups is not None:  # built with the trained count, then merged as when it was saved
            self.num_clusters = len(merged_groups)
        self.heads = nn.ModuleDict({h: self._make_head(backbone.feature_dim) for h in head_names})
        if merged_groups is not None:
            self.merge_clusters(merged_groups)
            if self.num_clusters != int(num_clusters):
                raise ValueError(f"merged_groups form {self.num_clusters} groups, num_clusters is {num_clusters}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _make_head(self, in_dim: int) -> nn.Module:
        if self.head_kind == "prototype":
            return PrototypeHead(in_dim, self.num_clusters)
        return MLPHead(in_dim, self.hidden_dim, self.num_clusters, self.head_batchnorm)

    def merge_clusters(self, groups: list[int]) -> None:
        """Merge every head's clusters into groups: cluster j of the trained heads becomes part of
        group ``groups[j]`` (:class:`MergedHead`); ``num_clusters`` becomes the number of groups."""
        if self.merged_groups is not None:
            raise ValueError("the clusters of this model are merged already")
        groups = [int(g) for g in groups]
        if len(groups) != self.num_clusters:
            raise ValueError(f"one group per trained cluster is needed: {len(groups)} groups for {self.num_clusters} clusters")
        device = next(self.heads.parameters()).device  # the membership buffer goes where the heads are
        self.heads = nn.ModuleDict({name: MergedHead(head, groups).to(device) for name, head in self.heads.items()})
        self.merged_groups = groups
        self.num_clusters = max(groups) + 1

    @property
    def trained_clusters(self) -> int:
        """How many clusters the heads were trained with (more than ``num_clusters`` when merged)."""
        return self.num_clusters if self.merged_groups is None else len(self.merged_groups)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def preprocess(self, images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float (N, 3, H, W), scaled to [0, 1] and normalised by mean/std."""
        x = images_uint8_nhwc.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        return self.backbone(x)

    def head_logits(self, z: torch.Tensor, head: str | None = None) -> torch.Tensor:  # (N, D) -> (N, C)
        return self.heads[head or self.predict_head](z)

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.embed(x))

    forward = cluster_logits

    def architecture(self) -> dict:
        return {
            "backbone": backbone_spec(self.backbone),
            "num_clusters": self.num_clusters,
            "hidden_dim": self.hidden_dim,
            "head_names": list(self.head_names),
            "predict_head": self.predict_head,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "head_batchnorm": self.head_batchnorm,
            "head_kind": self.head_kind,
            **({} if self.merged_groups is None else {"merged_groups": list(self.merged_groups)}),
        }

    @classmethod
    def from_architecture(cls, arch: dict) -> "ClusteringModel":
        return cls(
            backbone_from_spec(arch["backbone"]),
            num_clusters=arch["num_clusters"],
            hidden_dim=arch["hidden_dim"],
            head_names=tuple(arch["head_names"]),
            predict_head=arch["predict_head"],
            mean=tuple(arch["mean"]),
            std=tuple(arch["std"]),
            head_batchnorm=arch.get("head_batchnorm", True),  # checkpoints before the option had BN
            head_kind=arch.get("head_kind", "mlp"),  # checkpoints before K-means models had MLP heads
            merged_groups=arch.get("merged_groups"),
        )


def weights_digest(model: nn.Module) -> str:
    state = model.state_dict()
    return digest_arrays((k, state[k].detach().cpu().contiguous().numpy().tobytes()) for k in sorted(state))


def save_model(model: ClusteringModel, out_dir: str | os.PathLike, metadata: ModelMetadata) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = metadata.replace(weights_digest=weights_digest(model))
    tmp_weights = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp_weights))
    config = {"format": CHECKPOINT_FORMAT, "architecture": model.architecture(), "metadata": metadata.to_dict()}
    tmp_config = out_dir / f".{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(config, indent=2))
    os.replace(tmp_weights, out_dir / WEIGHTS_FILE)
    os.replace(tmp_config, out_dir / CONFIG_FILE)
    return out_dir


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> tuple[ClusteringModel, ModelMetadata]:
    """Load a checkpoint directory (or its config.json / model.safetensors) in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise CalibclustError(f"{directory} is not a calibclust checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise CalibclustError(f"{config_path}: format {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    model = ClusteringModel.from_architecture(config["architecture"])
    state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CalibclustError(f"{directory}: weights do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    metadata = ModelMetadata.from_dict(config["metadata"])
    return model.eval(), metadata
