"""A compact re-implementation of the original DiT ``models.py`` layout, used as the conversion reference."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Holder(nn.Module):
    """Attribute bag so that state-dict keys follow the original names (``x_embedder.proj``...)."""


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Holder()
        self.attn.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Holder()
        self.mlp.fc1 = nn.Linear(hidden, 4 * hidden)
        self.mlp.fc2 = nn.Linear(4 * hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attention(self, x):
        batch, length, channels = x.shape
        qkv = self.attn.qkv(x).reshape(batch, length, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = (q @ k.transpose(-2, -1) * (channels // self.heads) ** -0.5).softmax(dim=-1)
        return self.attn.proj((weights @ v).transpose(1, 2).reshape(batch, length, channels))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


class OriginalDiT(nn.Module):
    def __init__(
        self, input_size=8, patch_size=2, in_channels=4, hidden=32, depth=2, heads=4, num_classes=10, learn_sigma=True
    ):
        super().__init__()
        self.patch, self.out_channels = patch_size, in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = Holder()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.t_embedder = Holder()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = Holder()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(hidden, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(hidden, heads) for _ in range(depth)])
        self.final_layer = Holder()
        self.final_layer.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(timestep_embedding(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(-1, side, side, self.patch, self.patch, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, self.out_channels, side * self.patch, side * self.patch)


def random_original_dit(seed: int = 0, **kwargs) -> OriginalDiT:
    torch.manual_seed(seed)
    model = OriginalDiT(**kwargs)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.normal_(0, 0.2)
    return model.eval()
