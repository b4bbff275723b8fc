"""OpenUni's connector (`ConnectorEncoder`, FAMILY_FACTS.md C4): SigLIP-style pre-LN transformer
blocks over the 256 query states, bidirectional attention with biases, no mask, no positions,
no final norm. Parameter names are OpenUni's (`layers.N.self_attn.q_proj`, `layer_norm1`,
`mlp.fc1`, ...), so its checkpoint loads without renaming. Shapes: B batch, Q queries, D width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class ConnectorShape:
    width: int = 64  # = the LLM width (OpenUni's "enc_proj": the projector comes after)
    mlp: int = 128
    heads: int = 4
    layers: int = 2
    eps: float = 1e-6


class ConnectorAttention(nn.Module):
    def __init__(self, s: ConnectorShape):
        super().__init__()
        if s.width % s.heads:
            raise ValueError(f"connector width {s.width} is not a multiple of its {s.heads} heads")
        self.heads = s.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(s.width, s.width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Q, D] -> [B, Q, D], every query sees every query."""
        b, q, d = x.shape
        split = lambda t: t.view(b, q, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


class ConnectorMLP(nn.Module):
    def __init__(self, s: ConnectorShape):
        super().__init__()
        self.fc1 = nn.Linear(s.width, s.mlp)
        self.fc2 = nn.Linear(s.mlp, s.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_pytorch_tanh


class ConnectorEncoderLayer(nn.Module):
    def __init__(self, s: ConnectorShape):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(s.width, eps=s.eps)
        self.self_attn = ConnectorAttention(s)
        self.layer_norm2 = nn.LayerNorm(s.width, eps=s.eps)
        self.mlp = ConnectorMLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ConnectorEncoder(nn.Module):
    """`layers` blocks; OpenUni's initialisation (xavier-uniform projections, zero attention
    biases, N(0, 1e-6) MLP biases)."""

    def __init__(self, s: ConnectorShape):
        super().__init__()
        self.layers = nn.ModuleList(ConnectorEncoderLayer(s) for _ in range(s.layers))
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Q, D] -> [B, Q, D]."""
        for layer in self.layers:
            x = layer(x)
        return x


def _init(m: nn.Module) -> None:
    if isinstance(m, ConnectorAttention):
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
    elif isinstance(m, ConnectorMLP):
        for lin in (m.fc1, m.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

