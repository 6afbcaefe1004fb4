"""A small U-Net with a step embedding: the ε-prediction network of the Gaussian diffusion model.

Ho et al. (2020), "Denoising diffusion probabilistic models", Sec. 4 and App. B (a U-Net with group
normalisation and a sinusoidal step embedding added inside every residual block), at the size of the
diffusion baseline of Vargas Vieyra & Ménard, "Generative models as goal-conditioned reinforcement learning"
(Sec. 4.1: four resolution levels, group normalisation, ReLU). Images whose side four levels do not divide
(28 × 28 Fashion-MNIST) are padded with zeros inside :meth:`UNet.forward` (28 -> 32) and the output is cropped
back, so the model's state — and its likelihood — stays on the data's own pixels.

Symbols to code: the step t -> ``t`` (an int or a LongTensor with one step per row), its embedding ->
:func:`step_embedding` followed by an MLP, ε_θ(x_t, t) -> :meth:`UNet.forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def step_embedding(t: int | torch.Tensor, dim: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of the step t (Vaswani et al. 2017), (batch, dim), on ``like``'s device and dtype;
    ``t`` is one int for every row or a tensor of ``batch`` steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=like.device, dtype=like.dtype) / half)
    tt = torch.as_tensor(t, device=like.device, dtype=like.dtype).reshape(-1, 1).expand(batch, 1)
    e = torch.cat([torch.sin(tt * freqs), torch.cos(tt * freqs)], -1)
    return F.pad(e, (0, dim - e.shape[-1]))


class ResBlock(nn.Module):
    """GroupNorm -> ReLU -> conv, the step embedding added, GroupNorm -> ReLU -> conv, plus a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(h))) + self.emb(emb)[:, :, None, None]
        return self.skip(h) + self.conv2(F.relu(self.norm2(out)))


class UNet(nn.Module):
    """ε_θ(x_t, t) on flat images of ``image_shape``: ``len(mult)`` resolution levels with ``channels·m``
    channels each (one residual block per level on the way down, one per level on the way up taking the
    skip concatenated, and one in the middle), stride-2 convolutions down and nearest-neighbour upsampling
    up, group norm with ``groups`` groups, ReLU, and the step embedding (``embed_dim``) in every block.

    :param cond_dim: size of an optional conditioning vector added to the step embedding (0: none).
    :param extra_channels: image-sized conditioning maps concatenated to the input on the channel axis (0:
        none), as the GC-RL proposal network's embedding of (step, selection) (Vargas Vieyra & Ménard,
        App. B.1).
    """

    def __init__(self, image_shape: tuple[int, int], channels: int = 32, mult: tuple[int, ...] = (1, 2, 2, 2),
                 groups: int = 8, embed_dim: int = 128, cond_dim: int = 0, extra_channels: int = 0) -> None:
        super().__init__()
        if channels < 1 or not mult or any(m < 1 for m in mult) or groups < 1 or embed_dim < 2:
            raise ValueError(f"channels >= 1, a non-empty mult of ints >= 1, groups >= 1 and embed_dim >= 2 "
                             f"required, got {channels}, {mult}, {groups}, {embed_dim}")
        self.image_shape, self.embed_dim = tuple(image_shape), embed_dim
        div = 2 ** (len(mult) - 1)
        self.padded = tuple(-(-s // div) * div for s in self.image_shape)  # 28 -> 32 with four levels
        self.emb_mlp = nn.Sequential(nn.Linear(embed_dim + cond_dim, embed_dim * 2), nn.ReLU(),
                                     nn.Linear(embed_dim * 2, embed_dim * 2))
        emb = embed_dim * 2
        widths = [channels * m for m in mult]
        self.extra_channels = extra_channels
        self.stem = nn.Conv2d(1 + extra_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(c, w, emb, groups))
            c = w
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c, c, emb, groups)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(ResBlock(c + w, w, emb, groups))
            c = w
        self.out_norm, self.out = nn.GroupNorm(min(groups, c), c), nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ for flat images ``x`` (N, H·W) at step(s) ``t``, with the conditioning vector ``cond`` and the
        ``extra_channels`` maps ``extra`` (N, extra_channels·H·W); returns (N, H·W)."""
        n = x.shape[0]
        H, W = self.image_shape
        h = x.reshape(n, 1, H, W)
        if self.extra_channels:
            h = torch.cat([h, extra.reshape(n, self.extra_channels, H, W)], 1)
        pad_h, pad_w = self.padded[0] - H, self.padded[1] - W
        h = F.pad(h, (0, pad_w, 0, pad_h))
        e = step_embedding(t, self.embed_dim, n, x)
        e = self.emb_mlp(e if cond is None else torch.cat([e, cond], -1))
        h = self.stem(h)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, e)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), e)
        h = self.out(F.relu(self.out_norm(h)))
        return h[:, 0, :H, :W].reshape(n, H * W)
