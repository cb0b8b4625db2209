"""A small class-conditional DDPM: the generator G of GCC ("Generative Calibration Clustering" §3.2.3).

The diffusion is DDPM's ("Denoising Diffusion Probabilistic Models", Ho et al., the paper's [15]),
which GCC conditions on a cluster label ŷ:

* forward process (GCC Eq. 3): q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), ᾱ_t = Π_{s≤t} (1 − β_s) —
  :meth:`NoiseSchedule.add_noise`;
* reverse step (Eq. 4–5): x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) · ε_G(x_t, ŷ, t)) / √(1 − β_t) + σ(t) z,
  σ(t) = √((1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t) — :meth:`NoiseSchedule.reverse_step` (with DDPM's
  clipping of the implied image, see there), :func:`sample`;
* objective (Eq. 6): ‖ε − ε_G(x_t, ŷ, t)‖² — :func:`denoising_loss`.

GCC's text writes α_t for the cumulative product and drops square roots (its X_t = √α_t X_0 +
(1 − α_t) ε and Eq. 5's 1/α_t); the formulas above are DDPM's (its Eq. 4 and 11), which GCC cites
and whose σ(t) it keeps.

ε_G is a U-Net (:class:`ConditionalUNet`, DDPM Appendix B): residual blocks of two 3×3 convolutions
with ReLU and dropout (GCC §4.1), a sinusoidal time embedding plus a learnt cluster embedding added
inside every block, a stride-2 convolution down and nearest-neighbour upsampling + convolution up,
skip connections by concatenation. Images are (N, 3, S, S) in [−1, 1].
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class NoiseSchedule:
    """DDPM's linear β schedule over ``steps`` steps; index t = 0 … T−1 is the paper's t = 1 … T."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        if betas.ndim != 1 or len(betas) < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-d tensor in (0, 1)")
        self.betas = betas
        self.alpha_bar = torch.cumprod(1.0 - betas, 0)
        previous = torch.cat([torch.ones(1, dtype=betas.dtype), self.alpha_bar[:-1]])
        self.sigma = torch.sqrt((1.0 - previous) / (1.0 - self.alpha_bar) * betas)  # σ(t) of Eq. 4; σ = 0 at t = 1

    @classmethod
    def linear(cls, steps: int) -> "NoiseSchedule":
        """β from 1e-4 to 0.02 at DDPM's T = 1000; for fewer steps both ends grow by 1000/T (β_T capped
        at 0.999, which binds below T = 21), so the chain still ends in near-pure noise (ᾱ_T = 4.0e-5
        at T = 1000, 2.0e-5 at T = 100)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        scale = 1000.0 / steps
        return cls(torch.linspace(1e-4 * scale, min(0.02 * scale, 0.999), steps, dtype=torch.float64))

    @property
    def steps(self) -> int:
        return len(self.betas)

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Indexed on the CPU, cast, then moved: some devices (Apple's MPS) hold no float64.
        return values[t.cpu()].to(like.dtype).to(like.device).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Eq. 3's closed form)."""
        ab = self._at(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def reverse_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, z: torch.Tensor | None,
                     clip: bool = True) -> torch.Tensor:
        """One step of Eq. 4, all rows at step ``t``; ``z`` ~ N(0, I) (unused at t = 0).

        The mean is Eq. 5's, written as DDPM's code computes it: the image estimate
        x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t, then the posterior mean of q(x_{t−1} | x_t, x̂_0),
        (β_t √ᾱ_{t−1} x̂_0 + (1 − ᾱ_{t−1}) √(1 − β_t) x_t)/(1 − ᾱ_t) — algebraically Eq. 5. With
        ``clip`` x̂_0 is clipped to the image range first, as DDPM's sampler does by default: a
        briefly trained ε_G otherwise drifts to saturated black or white images (measured on digits
        after 660 CPU steps: about half the samples)."""
        beta, ab = float(self.betas[t]), float(self.alpha_bar[t])
        ab_prev = float(self.alpha_bar[t - 1]) if t > 0 else 1.0
        x0 = (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean = (beta * math.sqrt(ab_prev) * x0 + (1.0 - ab_prev) * math.sqrt(1.0 - beta) * x_t) / (1.0 - ab)
        return mean + float(self.sigma[t]) * z if t > 0 else mean


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of DDPM / the Transformer: (N,) steps → (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(1, half))
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], 1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class ResBlock(nn.Module):
    """Two 3×3 convolutions with ReLU and dropout (GCC §4.1), the embedding added between them, a
    1×1 convolution on the skip path when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2, self.drop = _norm(out_channels), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.relu(self.norm2(h))))
        return self.skip(x) + h


class ConditionalUNet(nn.Module):
    """ε_G(x_t, ŷ, t): a U-Net of ``len(multipliers)`` resolutions (the image side must be divisible
    by 2^(levels − 1)), ``blocks`` residual blocks per resolution on the way down and up, two in the
    middle; ``channels`` × multiplier wide at each resolution."""

    def __init__(self, num_classes: int, channels: int = 32, multipliers: tuple[int, ...] = (1, 2, 2), blocks: int = 1,
                 dropout: float = 0.1, image_channels: int = 3):
        super().__init__()
        if num_classes < 1 or channels < 1 or blocks < 1 or not multipliers:
            raise ValueError("num_classes, channels and blocks must be >= 1, multipliers not empty")
        self.num_classes, self.levels = int(num_classes), len(multipliers)
        emb_dim = 4 * channels
        self.time_dim = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.ReLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim)  # ŷ: the cluster a sample is conditioned on
        self.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
        widths = [channels * m for m in multipliers]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        width = channels
        for i, out in enumerate(widths):
            self.down.append(nn.ModuleList([ResBlock(width if b == 0 else out, out, emb_dim, dropout) for b in range(blocks)]))
            width = out
            if i < self.levels - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.middle = nn.ModuleList([ResBlock(width, width, emb_dim, dropout) for _ in range(2)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(self.levels)):
            out = widths[i]
            self.up.append(nn.ModuleList([ResBlock((width + out) if b == 0 else out, out, emb_dim, dropout)
                                          for b in range(blocks)]))
            width = out
            if i > 0:
                self.upsample.append(nn.Conv2d(width, width, 3, padding=1))
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # DDPM's zero-initialised output: ε̂ = 0 at the start
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        if x.shape[-2] != side or side % (2 ** (self.levels - 1)):
            raise ValueError(f"images must be square with a side divisible by {2 ** (self.levels - 1)}, got {tuple(x.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_emb(labels)
        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
        for block in self.middle:
            h = block(h, emb)
        for j, level in enumerate(self.up):
            if j > 0:
                h = self.upsample[j - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips.pop()], 1)
            for block in level:
                h = block(h, emb)
        return self.conv_out(F.relu(self.norm_out(h)))


def denoising_loss(net: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Eq. 6 on one batch: a uniform step t and ε ~ N(0, I) per image, MSE of ε_G's estimate."""
    t = torch.randint(0, schedule.steps, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return F.mse_loss(net(schedule.add_noise(x0, t, noise), t, labels).float(), noise)


@torch.no_grad()
def sample(net: nn.Module, schedule: NoiseSchedule, labels: torch.Tensor, side: int, generator: torch.Generator,
           autocast=None, channels: int = 3) -> torch.Tensor:
    """Images of the given clusters by the reverse process from pure noise, T steps of Eq. 4–5
    (ancestral DDPM sampling), clipped to [−1, 1]: (N, channels, side, side) float32. ``autocast``:
    a context factory for the network's passes (the chain itself stays in float32)."""
    was = net.training
    net.eval()
    device = labels.device
    x = torch.randn((len(labels), channels, side, side), generator=generator).to(device)
    for t in reversed(range(schedule.steps)):
        steps = torch.full((len(labels),), t, dtype=torch.long, device=device)
        with (autocast or contextlib.nullcontext)():
            eps = net(x, steps, labels)
        z = torch.randn(x.shape, generator=generator).to(device) if t > 0 else None
        x = schedule.reverse_step(x, eps.float(), t, z)
    net.train(was)
    return x.clamp(-1.0, 1.0)
