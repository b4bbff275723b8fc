"""BAGEL's Mixture-of-Transformers LLM (Qwen2-shaped), one shared attention over a pack.

Every layer holds two experts with the same shapes: the understanding expert (`q_proj`, ...,
`mlp`, `input_layernorm`, ...) for text, markers and ViT tokens, and the generation expert
(`*_moe_gen`) for latent tokens; the final norm is duplicated too (`norm`, `norm_moe_gen`).
Module names are BAGEL's (`Qwen2MoTDecoderLayer`, `PackedAttentionMoT`), so the state dict is
the released `language_model.*` layout [R: FAMILY_FACTS A2].

The pack arrives in expert order (`reca.models.bagel.pack`): understanding hidden states
xu [Su, D] and generation hidden states xg [B T, D] travel as two tensors; only the attention
concatenates them. With `detach_und` (BAGEL's freeze_und) the understanding rows of the shared
attention output are detached, as BAGEL does [R: A3], so no gradient is computed into the
frozen expert. Understanding tokens never see a latent token, with one exception that BAGEL
has too: the two markers of the vae split are understanding tokens inside the noise split, so
they attend to its latents; detached, they pass no gradient back to the latents.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reca.models.layers import Qwen2Shape

_flex = None


def _compiled_flex():
    """flex_attention compiled once, on first use (BAGEL compiles it too; eager flex
    materialises the scores). Nothing happens at import."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [1, H, S, Dh], k/v [1, Hkv, S, Dh], mask a flex BlockMask or a bool [S, S] -> [1, H, S, Dh]."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True)


def rope_tables(ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2's rotary tables at position ids [S] -> cos, sin [S, 1, Dh] (float32)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, device=ids.device, dtype=torch.float32) / head_dim)
    freqs = ids.float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, H, Dh] rotated (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PackedAttentionMoT(nn.Module):
    def __init__(self, q: Qwen2Shape):
        super().__init__()
        d, self.heads, self.kv_heads = q.hidden_size, q.num_heads, q.num_kv_heads
        self.head_dim = d // q.num_heads
        hd = self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(d, self.heads * hd))
            setattr(self, "k_proj" + suffix, nn.Linear(d, self.kv_heads * hd))
            setattr(self, "v_proj" + suffix, nn.Linear(d, self.kv_heads * hd))
            setattr(self, "o_proj" + suffix, nn.Linear(self.heads * hd, d, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(hd, q.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(hd, q.rms_norm_eps))
        self.detach_und = False

    def _qkv(self, x: torch.Tensor, suffix: str):
        n, hd = x.shape[0], self.head_dim
        get = lambda name: getattr(self, name + suffix)  # noqa: E731
        q = get("q_norm")(get("q_proj")(x).view(n, self.heads, hd))
        k = get("k_norm")(get("k_proj")(x).view(n, self.kv_heads, hd))
        return q, k, get("v_proj")(x).view(n, self.kv_heads, hd)

    def forward(self, xu, xg, cos, sin, mask):
        """xu [Su, D], xg [G, D] (normed), cos/sin [S, 1, Dh] -> (und out [Su, D], gen out [G, D])."""
        nu = xu.shape[0]
        qu, ku, vu = self._qkv(xu, "")
        qg, kg, vg = self._qkv(xg, "_moe_gen")
        q = apply_rope(torch.cat([qu, qg]), cos, sin)
        k = apply_rope(torch.cat([ku, kg]), cos, sin)
        v = torch.cat([vu, vg])
        o = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)
        o = o[0].transpose(0, 1).reshape(q.shape[0], -1)
        ou = o[:nu].detach() if self.detach_und else o[:nu]
        return self.o_proj(ou), self.o_proj_moe_gen(o[nu:])


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self, q: Qwen2Shape):
        super().__init__()
        self.self_attn = PackedAttentionMoT(q)
        self.mlp = MLP(q.hidden_size, q.intermediate_size)
        self.mlp_moe_gen = MLP(q.hidden_size, q.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(q.hidden_size, q.rms_norm_eps))
            setattr(self, name + "_moe_gen", RMSNorm(q.hidden_size, q.rms_norm_eps))

    def forward(self, xu, xg, cos, sin, mask):
        au, ag = self.self_attn(self.input_layernorm(xu), self.input_layernorm_moe_gen(xg), cos, sin, mask)
        xu, xg = xu + au, xg + ag
        xu = xu + self.mlp(self.post_attention_layernorm(xu))
        xg = xg + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(xg))
        return xu, xg


class Qwen2MoTModel(nn.Module):
    def __init__(self, q: Qwen2Shape):
        super().__init__()
        self.embed_tokens = nn.Embedding(q.vocab_size, q.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer(q) for _ in range(q.num_layers))
        self.norm = RMSNorm(q.hidden_size, q.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(q.hidden_size, q.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    """`language_model`: `model` (embeddings, layers, two final norms) and the untied `lm_head`
    (kept for the layout and the counts; RecA has no text loss)."""

    def __init__(self, q: Qwen2Shape):
        super().__init__()
        self.shape = q
        self.model = Qwen2MoTModel(q)
        self.lm_head = nn.Linear(q.hidden_size, q.vocab_size, bias=False)

    def forward(self, xu: torch.Tensor, xg: torch.Tensor, rope_ids: torch.Tensor, mask):
        """Pack in expert order: xu [Su, D], xg [G, D], RoPE ids [Su + G] -> final hidden states
        (und [Su, D] after `norm`, gen [G, D] after `norm_moe_gen`)."""
        q = self.shape
        cos, sin = rope_tables(rope_ids, q.hidden_size // q.num_heads, q.rope_theta)
        for layer in self.model.layers:
            xu, xg = layer(xu, xg, cos, sin, mask)
        return self.model.norm(xu), self.model.norm_moe_gen(xg)
