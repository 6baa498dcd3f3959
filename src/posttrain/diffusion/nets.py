"""Small denoisers with sinusoidal time embeddings (Vaswani et al. 2017 §3.5, as used by Ho et al. 2020 Appendix B).

`MLPDenoiser` serves both the 2-D data and the 8×8 digits (flattened to 64 values): on two CPU cores a residual MLP
samples a thousand digits over a thousand steps in about a minute, where even a small U-Net takes tens of minutes;
the digits are small enough that the MLP learns them (see experiments/diffusion_steps). `DiscreteDenoiser` maps a
sequence of L categorical tokens to x̃_0 logits for D3PM. Every network takes (x_t, t) with integer t [B] and
`num_train_timesteps`; none knows which scheduler drives it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t ω_i), sin(t ω_i)] with ω_i = max_period^(−i/(dim/2)), i < dim/2. t: [B] (any real). Returns [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)  # [dim/2]
    args = t.float()[:, None] * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


class ResidualBlock(nn.Module):
    """x + W₂ SiLU(W₁ LayerNorm(x) + time_proj(e_t)): a pre-norm MLP block conditioned on the time embedding."""

    def __init__(self, width: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(time_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.time(emb)))


class MLPDenoiser(nn.Module):
    """x_t [B, data_dim], t [B] -> output [B, data_dim] (ε̂, x̂_0, v̂ or x̂_{t−Δt}: the scheduler decides the meaning)."""

    def __init__(self, data_dim: int, hidden_dim: int = 128, num_layers: int = 3, time_embed_dim: int = 64,
                 num_train_timesteps: int = 1000):
        super().__init__()
        self.time_embed_dim = time_embed_dim
        self.num_train_timesteps = num_train_timesteps
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.inp = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList([ResidualBlock(hidden_dim, hidden_dim) for _ in range(num_layers)])
        # no norm before the output: the residual stream keeps |x_t|, which ε ≈ x_t at large t needs (a final
        # LayerNorm cost DDIM far outliers from the Gaussian tails on two moons)
        self.out = nn.Linear(hidden_dim, data_dim)
        nn.init.zeros_(self.out.weight)  # start at output 0: ε̂ = 0 (x̂_0 = x_t/√ᾱ), a calm first step
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the embedding sees t on a 0..1000 scale whatever T is, so frequencies suit any num_train_timesteps
        emb = self.time_mlp(timestep_embedding(t.float() * (1000.0 / self.num_train_timesteps), self.time_embed_dim))
        h = self.inp(x_t)  # [B, D]
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(h))  # [B, data_dim]


class DiscreteDenoiser(nn.Module):
    """x_t [B, L] long (K states), t [B] -> x̃_0 logits [B, L, K]: token + position embeddings, flattened, MLP."""

    def __init__(self, seq_len: int, num_classes: int, hidden_dim: int = 128, num_layers: int = 2,
                 embed_dim: int = 16, time_embed_dim: int = 32, num_train_timesteps: int = 100):
        super().__init__()
        self.seq_len, self.num_classes = seq_len, num_classes
        self.time_embed_dim = time_embed_dim
        self.num_train_timesteps = num_train_timesteps
        self.token = nn.Embedding(num_classes, embed_dim)
        self.position = nn.Parameter(torch.zeros(seq_len, embed_dim))
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.inp = nn.Linear(seq_len * embed_dim, hidden_dim)
        self.blocks = nn.ModuleList([ResidualBlock(hidden_dim, hidden_dim) for _ in range(num_layers)])
        self.out = nn.Linear(hidden_dim, seq_len * num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        emb = self.time_mlp(timestep_embedding(t.float() * (1000.0 / self.num_train_timesteps), self.time_embed_dim))
        h = self.inp((self.token(x_t) + self.position).reshape(B, -1))  # [B, D]
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(h)).reshape(B, self.seq_len, self.num_classes)  # [B, L, K]
