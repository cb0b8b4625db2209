"""MoCo-v2's modules: the projector and the query / momentum-key encoders with their queue of negatives.

Trained by :mod:`calibclust.pretrain` (which also holds the InfoNCE loss and the schedule). The
parameter and buffer names (``encoder_q.backbone.*``, ``encoder_q.projector.fc1.*``, ``encoder_k.*``,
``queue``, ``queue_ptr``) are those of the resume checkpoints, so they must not change.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Linear → BN → ReLU → Linear (CDC appendix B.1)."""

    def __init__(self, in_dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):  # (N, D) -> (N, out)
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and the queue of negatives (SPICE Eq. (1)).

    ``backbone`` (with ``feature_dim``) becomes the query encoder's trunk; the projector is built
    here, after it, then both are copied into the key encoder, and the ``queue_length`` random unit
    keys are drawn from their own generator seeded by ``seed``: the same draws, in the same order,
    give the same initial state for the same global seed.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int, proj_dim: int, queue_length: int,
                 momentum: float, seed: int):
        super().__init__()
        self.momentum = momentum
        self.encoder_q = nn.Sequential(
            OrderedDict(backbone=backbone, projector=Projector(backbone.feature_dim, proj_hidden_dim, proj_dim))
        )
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        # MoCo starts from random unit vectors; they are flushed after queue_length / batch steps.
        self.register_buffer("queue", F.normalize(torch.randn(queue_length, proj_dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self):
        return self.encoder_q.backbone

    @torch.no_grad()
    def momentum_update(self):
        # θ_k ← μ θ_k + (1 − μ) θ_q  (SPICE §III-A after Eq. (1)); lerp_ does exactly this.
        q = [p.detach() for p in self.encoder_q.parameters()]
        k = list(self.encoder_k.parameters())
        torch._foreach_lerp_(k, q, 1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys):
        n, size = keys.shape[0], self.queue.shape[0]
        keys = keys.to(self.queue.dtype)
        if n >= size:
            self.queue.copy_(keys[-size:])
            self.queue_ptr.zero_()
            return
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
