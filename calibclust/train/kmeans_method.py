"""K-means on frozen backbone features, as a method: the baseline every table starts from.

Also the smallest example of :class:`calibclust.train.methods.ClusteringMethod`: this module and
its line in :data:`calibclust.train.methods.METHODS` are all it takes. The centres become the model's
one head (:class:`calibclust.models.clustering.PrototypeHead`, DEC's Student-t soft assignment), so
a K-means model exports, labels and serves like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from calibclust.config import Config
from calibclust.train.methods import ClusteringMethod


@dataclass
class KMeansConfig(Config):
    TITLE: ClassVar[str] = "K-means configuration"

    num_clusters: int = 10
    restarts: int = 3  # k-means++ seeded runs, best by inertia
    max_iter: int = 100
    seed: int = 0

    def problems(self) -> list[str]:
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.restarts < 1 or self.max_iter < 1:
            problems.append("restarts and max_iter must be >= 1")
        return problems


class KMeansMethod(ClusteringMethod):
    name = "kmeans"
    config_class = KMeansConfig

    def row_names(self) -> list[str]:
        return ["K-means"]

    def _fit(self, data, backbone, backbone_info, out_dir, eval_data, resume) -> None:  # fast: never resumes
        import torch
        import torch.nn.functional as F

        from calibclust.cluster.kmeans import kmeans
        from calibclust.metadata import ModelMetadata
        from calibclust.models.backbones import backbone_label
        from calibclust.models.clustering import ClusteringModel, PrototypeHead
        from calibclust.train.data import embed_images

        model = ClusteringModel(backbone, self.n_clusters, head_names=("clustering",), predict_head="clustering",
                                head_kind="prototype", mean=backbone_info["mean"],
                                std=backbone_info["std"]).to(self.device).eval()
        # The head scores L2-normalised features, so the centres are fitted on them too.
        z = F.normalize(embed_images(model, data.images, device=self.device).float(), dim=1)
        result = kmeans(z, self.n_clusters, n_init=self.config.restarts, max_iter=self.config.max_iter,
                        seed=self.config.seed)
        model.heads["clustering"] = PrototypeHead.from_centers(result.centers.to(z))
        sizes = torch.bincount(result.labels.cpu(), minlength=self.n_clusters).tolist()
        self.model = model
        self.metadata = ModelMetadata(
            num_clusters=self.n_clusters, input_size=data.image_size, mean=tuple(model.mean.flatten().tolist()),
            std=tuple(model.std.flatten().tolist()), method=self.name, resize=data.resize, probs_head="clustering",
            calibrated=False, backbone=backbone_label(backbone), embedding_dim=model.feature_dim,
            # The soft assignment is no probability of being right (held-out digits: mean 0.12 at ACC
            # 0.77), so labelling cuts nothing by confidence unless asked (--coverage still ranks by it).
            confidence_threshold=0.0,
            train_stats={"n_images": data.num_images, "cluster_sizes": sizes, "inertia": float(result.inertia),
                         "config": self.config.to_dict(), "backbone_source": backbone_info.get("source", "")},
        )
