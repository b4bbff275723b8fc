"""Janus's text-to-image sampling, as transformers' `JanusForConditionalGeneration.generate(
generation_mode="image")` computes it, code for code with greedy decoding:

    rows       the B conditional prompts, then B unconditional ones (every token but <bos> and
               <begin_of_image> the pad token, no visual prompt; attention as the conditional)
    cache      a `StaticCache` of prompt + N positions (what generate prepares)
    each code  the LLM's last hidden state -> generation head -> logits [2B, K];
               guided = uncond + scale * (cond - uncond) when scale > 1
               (`ClassifierFreeGuidanceLogitsProcessor`), else the conditional logits;
               argmax (temperature 0), or a draw from softmax(guided / temperature) with the
               run's generator (generation_inference.py samples so, at temperature 1);
               the code's generation embedding (generation_embeddings -> generation_aligner)
               is the next input of both rows.

The prompt arrives right-padded to P; its rows are moved to the right end (left padding, as
JanusProcessor pads) and the columns every row pads are dropped, so an unpadded batch is exactly
the sequence transformers sees; positions count a row's tokens only, as training does. The KV
cache grows one position a step: the shapes change every code.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import StaticCache

from reca.models.adapter import PromptBatch


@functools.cache
def _cache_keyword(forward) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); 5.17 knows only the first and
    would put the other in **kwargs unused."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def left_aligned(embeds: torch.Tensor, prompt: PromptBatch) -> tuple[torch.Tensor, PromptBatch]:
    """Right-padded [B, P, ...] -> left-padded [B, L, ...], L the longest row (a host sync:
    sampling only)."""
    p = prompt.mask.shape[1]
    lengths = prompt.mask.sum(1, keepdim=True)
    src = (torch.arange(p, device=prompt.mask.device) + lengths) % p  # [B, P]: each row rotated right
    longest = int(lengths.max())
    src = src[:, p - longest:]
    ids, mask = prompt.input_ids.gather(1, src), prompt.mask.gather(1, src)
    return embeds.gather(1, src[..., None].expand(*src.shape, embeds.shape[-1])), PromptBatch(ids, mask)


@torch.no_grad()
def sample_codes(model, embeds: torch.Tensor, prompt: PromptBatch, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Prompt embeddings [B, P, D] (the visual prompt written in) and their ids/mask -> image
    codes [B, N] (`model`: a `JanusModel`)."""
    cfg, janus, lm = model.cfg, model.janus, model.lm
    n, scale = model.num_codes, cfg.guidance_scale
    embeds, prompt = left_aligned(embeds, prompt)
    b, length = prompt.mask.shape
    guided = scale > 1
    if guided:
        uncond = lm.embed_tokens(model.unconditional(prompt.input_ids)).to(embeds.dtype)
        embeds = torch.cat([embeds, uncond])
        mask = torch.cat([prompt.mask, prompt.mask]).long()
    else:
        mask = prompt.mask.long()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    cache = StaticCache(config=janus.config.get_text_config(), max_cache_len=length + n)
    keyword = _cache_keyword(type(lm).forward)
    head = janus.model.generation_head
    codes = torch.empty(b, n, dtype=torch.long, device=embeds.device)
    for i in range(n):
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache})
        logits = head(out.last_hidden_state[:, -1])
        if guided:
            cond, uncond = logits.split(b)
            logits = uncond + (cond - uncond) * scale
        if cfg.sample_temperature > 0:
            probs = torch.softmax(logits.float() / cfg.sample_temperature, dim=-1)
            code = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            code = logits.argmax(-1)
        codes[:, i] = code
        step = torch.cat([code, code]) if guided else code
        embeds = janus.prepare_embeddings_for_image_generation(step[:, None]).to(embeds.dtype)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return codes
