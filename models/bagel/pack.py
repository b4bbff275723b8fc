"""BAGEL's packed sequence for one micro-batch, and its attention mask.

The B samples of a micro-batch become ONE sequence of fixed length S (shapes never change, so
compiled graphs and CUDA graphs are reused). Each sample is BAGEL's RecA plan [R: FAMILY_FACTS A4,
A9], three splits:

    vit   <|vision_start|> N ViT tokens <|vision_end|>    mode "full"   one RoPE id (0)
    text  <|im_start|> instruction <|im_end|>             mode "causal" consecutive RoPE ids
                                                          (dropped whole with p 0.1: length 0)
    vae   <|vision_start|> T latent tokens <|vision_end|> mode "noise"  one RoPE id

Mask (BAGEL's `create_sparse_mask`, A5): a query sees a key of the same sample when the key is
earlier (causal) or in the same full/noise split, and a key in a noise split is seen only by
its own split. Padding is a trailing causal "sample" of its own (BAGEL pads the same way), so no
row is empty.

Storage order (a departure in layout, not in semantics): the pack is held in *expert order*,
all understanding tokens of the pack first (each sample's vit split, kept text and the two vae
markers, compacted, then the padding), then the B x T latent tokens, which use the generation
expert. Each token carries its place in BAGEL's order (`pos`, for causality), its sample
(`doc`), split and mode, so the mask is BAGEL's exactly while each expert runs on one
contiguous slice (no gather/scatter per layer) and the latent tokens come out as [B, T].
Everything is built on the device from the prompt mask and the dropout draw: no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CAUSAL, FULL, NOISE = 0, 1, 2  # split modes


@dataclass
class Pack:
    """Index tensors of one pack. S = n_und + B T; Su = n_und understanding slots."""

    src: torch.Tensor  # [Su] int64: row of the flattened [B (P + 2) + 1] und source (last row = padding)
    doc: torch.Tensor  # [S] int32: sample of each token (B = padding)
    split: torch.Tensor  # [S] int32: globally unique split id (3 b + 0/1/2; 3 B = padding)
    mode: torch.Tensor  # [S] int32: CAUSAL / FULL / NOISE
    pos: torch.Tensor  # [S] int32: place in BAGEL's order within its sample (causality)
    rope: torch.Tensor  # [S] int64: RoPE position id
    n_und: int  # Su (a Python int: fixed for a preset)
    text_tokens: torch.Tensor  # [B] int64: kept text-split tokens per sample (0 when dropped)


def pack_length(batch: int, prompt_len: int, latent_tokens: int, multiple: int = 128) -> tuple[int, int]:
    """(Su, S): und slots hold every sample's longest case (P + 2 tokens), rounded up so that S
    is a multiple of the flex-attention block size."""
    su = batch * (prompt_len + 2)
    s = su + batch * latent_tokens
    pad = (-s) % max(multiple, 1)
    return su + pad, s + pad


def build_pack(mask: torch.Tensor, vit_split: int, latent_tokens: int, keep_text: torch.Tensor,
               keep_vit: bool = True, multiple: int = 128) -> Pack:
    """The pack of B prompts (right-padded, `mask` [B, P] bool) laid out as
    `<|vision_start|> {image} <|vision_end|> <|im_start|> ... <|im_end|>`, whose first
    `vit_split` positions are the vit split, plus T latent tokens per sample.

    keep_text [B] bool: False drops the sample's text split (BAGEL's text_cond_dropout).
    keep_vit False drops every vit split (text-only prompts: sampling without an image)."""
    b, p = mask.shape
    t, dev = latent_tokens, mask.device
    su, s = pack_length(b, p, t, multiple)
    j = torch.arange(p + 2, device=dev)[None].expand(b, -1)  # columns P, P + 1: the vae markers
    in_prompt = j < p
    is_vit = (j < vit_split) & keep_vit
    is_text = (j >= vit_split) & in_prompt & torch.cat([mask, mask.new_zeros(b, 2)], 1) & keep_text[:, None]
    keep = is_vit | is_text | ~in_prompt
    count = keep.sum(1)
    offset = count.cumsum(0) - count
    dest = torch.where(keep, offset[:, None] + keep.cumsum(1) - 1, su)  # dropped -> a discarded slot
    pad_row = b * (p + 2)
    src = torch.full((su + 1,), pad_row, dtype=torch.long, device=dev)
    src = src.scatter(0, dest.flatten(), torch.arange(pad_row, device=dev))[:su]

    text_tokens = is_text.sum(1)
    first_text = 1 if keep_vit else 0  # RoPE: the vit split takes id 0, then the id advances by one
    vae_rope = first_text + text_tokens  # [B]; the id is not advanced after a loss image
    row = torch.arange(b, device=dev)[:, None].expand(-1, p + 2)
    split_kind = torch.where(j < vit_split, 0, torch.where(in_prompt, 1, 2))
    meta = {
        "doc": row,
        "split": 3 * row + split_kind,
        "mode": torch.where(split_kind == 0, FULL, torch.where(split_kind == 1, CAUSAL, NOISE)),
        "pos": torch.where(in_prompt, j, torch.where(j == p, p, p + 1 + t)),  # markers around the latents
        "rope": torch.where(split_kind == 0, 0, torch.where(split_kind == 1, j - vit_split + first_text,
                                                             vae_rope[:, None])),
    }
    is_pad = src == pad_row
    slot = torch.arange(su, device=dev)
    pad_value = {"doc": b, "split": 3 * b, "mode": CAUSAL, "pos": slot, "rope": slot * 0}
    und = {k: torch.where(is_pad, pad_value[k], torch.cat([v.flatten(), v.new_zeros(1)])[src]) for k, v in meta.items()}

    gb = torch.arange(b, device=dev).repeat_interleave(t)
    gen = {"doc": gb, "split": 3 * gb + 2, "mode": torch.full_like(gb, NOISE),
           "pos": (p + 1 + torch.arange(t, device=dev)).repeat(b), "rope": vae_rope.repeat_interleave(t)}
    cat = {k: torch.cat([und[k], gen[k]]) for k in meta}
    i32 = {k: cat[k].to(torch.int32) for k in ("doc", "split", "mode", "pos")}
    return Pack(src=src, rope=cat["rope"].long(), n_und=su, text_tokens=text_tokens, **i32)


def mask_mod_of(pack: Pack):
    """flex-attention `mask_mod(b, h, q, kv) -> bool` of the pack (True = may attend)."""
    doc, split, mode, pos = pack.doc, pack.split, pack.mode, pack.pos

    def mask_mod(b, h, q, kv):
        same_split = split[q] == split[kv]
        seen = (pos[q] >= pos[kv]) | (same_split & (mode[q] != CAUSAL))
        hidden_noise = (mode[kv] == NOISE) & ~same_split
        return (doc[q] == doc[kv]) & seen & ~hidden_noise

    return mask_mod


def attention_mask(pack: Pack, kind: str, block_size: int = 128, dense_limit: int = 8192):
    """The mask the attention takes: a flex `BlockMask` ("flex"), or ("dense") a boolean [S, S]
    evaluated from the same `mask_mod`, for CPU training only: flex attention has no CPU
    backward in torch 2.13, so the dense form is refused beyond `dense_limit` tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    s = pack.doc.numel()
    if kind == "dense":
        if s > dense_limit:
            raise ValueError(f"a dense attention mask of {s} tokens is refused (> {dense_limit}); use flex on a GPU")
        idx = torch.arange(s, device=pack.doc.device)
        return mask_mod_of(pack)(0, 0, idx[:, None], idx[None, :])  # the mask_mod broadcast, not vmapped
    # compiled on accelerators (BAGEL: _compile=True): never materialises [S, S]
    return create_block_mask(mask_mod_of(pack), None, None, s, s, device=pack.doc.device,
                             BLOCK_SIZE=block_size, _compile=pack.doc.device.type != "cpu")
