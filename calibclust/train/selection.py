"""Pseudo-label selection strategies behind one small interface.

A training loop hands a strategy what it knows about one batch (:class:`SelectionInputs`: the
probabilities of the head that selects, optionally embeddings, ensemble probabilities, indices
into the dataset) and gets back a :class:`Selection` — which rows of the batch get a pseudo label
and which label. Strategies are built from a short spec string through a registry, so a CLI
flag such as ``--select fixed:0.95`` and a library call ``build_strategy("cdc")`` go the same way,
and other methods (SPICE's prototype / reliable selection, SPC's ensemble agreement) register
their own strategies on the same seam without touching the loops.

Shipped here:

* ``cdc`` — CDC's calibrated per-class selection ("Towards Calibrated Deep Clustering Network" §3.2, Eq. 4),
* ``fixed`` — a global confidence threshold (SCAN / DCCM style; CDC Tab. 2-II baseline).

No strategy ever sees ground-truth labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


@dataclass
class SelectionInputs:
    """What a strategy may look at for one batch (tensors on one device).

    ``probs``: (N, C) probabilities of the selecting head on the weak view (required).
    ``embeddings``: (N, D) backbone features, for prototype/neighbourhood strategies.
    ``ensemble_probs``: (M, N, C) probabilities of M heads/models, for ensemble agreement.
    ``indices``: (N,) positions of the rows in the whole dataset, for dataset-level strategies.
    ``extra``: anything else a registered strategy documents that it needs.
    """

    probs: torch.Tensor
    embeddings: torch.Tensor | None = None
    ensemble_probs: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.probs.ndim != 2:
            raise ValueError(f"probs must be (N, C), got {tuple(self.probs.shape)}")

    @property
    def num_samples(self) -> int:
        return int(self.probs.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])


@dataclass
class Selection:
    """Rows of the batch that got a pseudo label (sorted, unique) and that label."""

    indices: torch.Tensor  # (S,) int64 rows of the batch
    labels: torch.Tensor  # (S,) int64 pseudo labels in [0, C)
    num_samples: int
    num_classes: int

    def __post_init__(self):
        if self.indices.shape != self.labels.shape:
            raise ValueError("indices and labels must have the same shape")

    def __len__(self) -> int:
        return int(self.indices.numel())

    def mask(self) -> torch.Tensor:
        """(N,) bool: which rows of the batch are selected."""
        m = torch.zeros(self.num_samples, dtype=torch.bool, device=self.indices.device)
        m[self.indices] = True
        return m

    def dense_labels(self, fill: int = -1) -> torch.Tensor:
        """(N,) int64 with the pseudo label of selected rows and ``fill`` elsewhere."""
        out = torch.full((self.num_samples,), fill, dtype=torch.long, device=self.indices.device)
        out[self.indices] = self.labels
        return out

    def counts(self) -> torch.Tensor:
        """(C,) number of selected samples per pseudo label (may contain zeros)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "Selection":
        idx = torch.nonzero(mask).flatten()
        return cls(idx, labels[idx].long(), int(mask.numel()), int(num_classes))


class SelectionStrategy(Protocol):
    name: str

    def select(self, inputs: SelectionInputs) -> Selection: ...

    def describe(self) -> str: ...


@dataclass
class CalibratedPerClass:
    """CDC's dynamic per-class selection ("Towards Calibrated Deep Clustering Network" §3.2, Eq. 4).

    For every cluster c: TOP(c) = the ``top_size`` rows with the largest p[:, c];
    M(c) = ⌊Σ_{i∈TOP(c)} max_j p_ij⌋; keep the first M(c) rows of TOP(c). The pseudo label of
    a kept row is argmax_j p_ij, so a row picked by two clusters is selected once with its argmax
    label.

    The paper writes TOP(c) with ⌊B/C⌋ rows and sums "p_i^{w.cal}"; the authors' code
    (ChengJianH/CDC ``train_cali``) sums each row's *max* probability, uses a fixed TOP size per
    dataset (100 for CIFAR-10/STL-10 with B = 1000, i.e. ⌊B/C⌋ of the nominal batch) and labels
    by argmax — we follow the code. ``top_size=None`` means ⌊N/C⌋ of the batch at hand.
    """

    top_size: int | None = None
    name: str = "cdc"

    def __post_init__(self):
        if self.top_size is not None and self.top_size < 1:
            raise ValueError(f"top_size must be >= 1, got {self.top_size}")

    def per_class_quota(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(TOP(c) row indices (C, T), M(c) (C,)) — Eq. 4 before de-duplication."""
        n, c = probs.shape
        top = self.top_size if self.top_size is not None else n // c
        top = max(0, min(top, n))
        conf = probs.max(1).values  # (N,)
        order = torch.argsort(probs, dim=0, descending=True, stable=True)[:top].T  # (C, T)
        # Sum in float64 so ⌊·⌋ is not moved by float32 rounding (e.g. 10 × 0.7 → 6.9999995).
        m = torch.floor(conf.double()[order].sum(1) + 1e-9).long() if top else torch.zeros(c, dtype=torch.long)
        return order, m.to(probs.device)

    def select(self, inputs: SelectionInputs) -> Selection:
        probs = inputs.probs
        order, m = self.per_class_quota(probs)
        mask = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
        if order.numel():
            rank = torch.arange(order.shape[1], device=probs.device)[None, :]
            keep = rank < m[:, None]  # (C, T)
            mask[order[keep]] = True
        return Selection.from_mask(mask, probs.argmax(1), probs.shape[1])

    def describe(self) -> str:
        top = "⌊B/C⌋" if self.top_size is None else str(self.top_size)
        return f"cdc (Eq. 4, TOP size {top})"


@dataclass
class FixedThreshold:
    """Select rows whose max probability exceeds a fixed ``threshold`` (SCAN's self-labelling,
    DCCM; CDC Tab. 2-II "Fixed Thre."). Pseudo label = argmax. May select nothing."""

    threshold: float = 0.95
    name: str = "fixed"

    def __post_init__(self):
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    def select(self, inputs: SelectionInputs) -> Selection:
        conf, labels = inputs.probs.max(1)
        return Selection.from_mask(conf > self.threshold, labels, inputs.num_classes)

    def describe(self) -> str:
        return f"fixed threshold {self.threshold:g}"


# --- registry -------------------------------------------------------------------------------------
StrategyFactory = Callable[..., SelectionStrategy]
_REGISTRY: dict[str, tuple[StrategyFactory, str]] = {}


def register_strategy(name: str, help: str = "") -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator: make ``factory(*args, **kwargs)`` buildable as ``"name:arg,key=value"``."""

    def wrap(factory: StrategyFactory) -> StrategyFactory:
        if name in _REGISTRY and _REGISTRY[name][0] is not factory:
            raise ValueError(f"selection strategy {name!r} is already registered")
        _REGISTRY[name] = (factory, help)
        return factory

    return wrap


def available_strategies() -> dict[str, str]:
    return {name: help for name, (_, help) in sorted(_REGISTRY.items())}


def _parse_value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, list, dict]:
    """``"fixed:0.95"`` → ("fixed", [0.95], {}); ``"cdc:top_size=50"`` → ("cdc", [], {"top_size": 50})."""
    name, _, rest = spec.strip().partition(":")
    args, kwargs = [], {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        if "=" in part:
            key, _, value = part.partition("=")
            kwargs[key.strip()] = _parse_value(value.strip())
        else:
            args.append(_parse_value(part))
    return name.strip().lower(), args, kwargs


def build_strategy(spec: str | SelectionStrategy, **defaults) -> SelectionStrategy:
    """Build a strategy from a spec string (see :func:`parse_spec`); ``defaults`` fill keyword
    arguments the spec does not give (e.g. the trainer's TOP size)."""
    if not isinstance(spec, str):
        return spec
    name, args, kwargs = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(f"unknown selection strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name][0]
    import inspect

    params = inspect.signature(factory).parameters
    for key, value in defaults.items():
        if key in params and key not in kwargs and not _given_positionally(params, key, len(args)):
            kwargs[key] = value
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for selection strategy {name!r}: {exc}") from None


def _given_positionally(params, key: str, n_args: int) -> bool:
    names = [p for p in params if params[p].kind in (params[p].POSITIONAL_ONLY, params[p].POSITIONAL_OR_KEYWORD)]
    return key in names[:n_args]


@register_strategy("cdc", "calibrated per-class selection (CDC Eq. 4); option top_size=T")
def _cdc(top_size: int | None = None) -> CalibratedPerClass:
    return CalibratedPerClass(top_size=top_size)


@register_strategy("fixed", "global confidence threshold, e.g. fixed:0.95 (SCAN/DCCM)")
def _fixed(threshold: float = 0.95) -> FixedThreshold:
    return FixedThreshold(threshold=float(threshold))
