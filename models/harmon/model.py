"""Harmon family (AR + MAR): a Qwen2 LLM between a MAR encoder and decoder, a diffusion-MLP head.

Understanding (the visual prompt): image -> frozen VAE latents [B, T, C] -> MAR encoder with
nothing masked -> its nb + T outputs, buffers moved to the end -> proj_in -> LLM width.
Generation (Harmon's `text2image_loss`, which RecA reuses): masked latents + buffers -> MAR
encoder -> proj_in -> appended after the prompt -> LLM -> proj_out, added as a residual to the
encoder stream -> MAR decoder (mask tokens where masked) -> per-token condition z -> DDPM loss
of the AdaLN-MLP head on the masked tokens only. The LLM sequence is

    prompt [P] (right-padded)  |  K kept-token slots (raster order, then padding)  |  nb buffers

under Harmon's plain causal mask: Harmon appends the encoder outputs after the prompt and calls
the LLM with a 2-D padding mask, so the image tokens attend causally among themselves (raster
order, buffers last: each buffer sees every kept token). K = `max_kept(T, 0.7)` (308 of 1024)
holds every kept token (`reca.models.harmon.mar.kept_slots`). Each row is packed before the LLM (valid
tokens first: exactly Harmon's right-padded sequence, positions 0..n-1) and unpacked after, so
the attention is plain causal with no mask (flash, native GQA); tests/test_harmon.py checks the
whole path against Harmon's variable-length computation sample by sample.
Shapes: B batch, P prompt, D LLM width, T = h w latent tokens, nb buffers, W MAR width.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from reca.kernels import KernelOps, get_ops
from reca.models.flops import Stage
from reca.models.adapter import CaptionBatch, LossOutput, PromptBatch, PromptTemplate, ViewSpec
from reca.models.base import Conditioning, RecaModule
from reca.models.harmon.diffhead import DiffHeadShape
from reca.models.layers import Qwen2Shape, freeze_except, patchify, unpatchify
from reca.models.harmon.mar import (MAR, MARShape, expected_kept, kept_slots, mask_by_order, max_kept, random_masking,
                              random_orders)
from reca.models.tokenizer import load_tokenizer
from reca.models.vae import VAEConfig, build_codec

MODULES = ("llm", "proj_in", "proj_out", "mar")


@dataclass(kw_only=True)
class HarmonConfig:
    family: str = "harmon"
    llm: Qwen2Shape = field(default_factory=Qwen2Shape)
    mar: MARShape = field(default_factory=MARShape)
    head: DiffHeadShape = field(default_factory=DiffHeadShape)
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(kind="patch", patch=4))
    image_size: int = 32  # both views (Harmon: 512, stretched to square)
    tie_embeddings: bool = True  # Qwen2.5-0.5B/1.5B tie the LM head to the embedding
    mask_ratio_min: float = 0.7  # mask ratio ~ normal(1, std) truncated to [min, 1]
    mask_ratio_std: float = 0.25
    sample_temperature: float = 1.0
    sample_clip: float = 0.0  # > 0: clamp the head's x0 predictions while sampling (tiny: pixels in [-1, 1])
    visual_grad_scale: float = 0.1
    trainable: tuple[str, ...] = MODULES  # all but the VAE
    tokenizer: str = ""  # a local HF tokenizer directory (Qwen2.5); empty = reca's tiny byte-level BPE


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class HarmonModel(RecaModule):
    """RecA adapter (see `reca.models.adapter.RecaAdapter`) for Harmon. Parameter names are those
    of Harmon's checkpoints (`llm.`, `proj_in.`, `proj_out.`, `mar.`), plus the frozen `codec.`."""

    objectives = frozenset({"recon", "caption", "sample"})
    capabilities = frozenset({"init_from", "export", "flop_plan"})

    def __init__(self, cfg: HarmonConfig, ops: KernelOps | None = None):
        super().__init__()
        if cfg.mar.buffer_size < 1:
            raise ValueError("mar.buffer_size must be >= 1 (a fully masked image leaves only the buffers)")
        self.cfg = cfg
        self.ops = ops or get_ops("torch")
        q = cfg.llm
        self.llm = Qwen2ForCausalLM(q.hf_config(tie_word_embeddings=cfg.tie_embeddings))
        self.codec = build_codec(cfg.vae)
        if cfg.image_size % self.codec.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of the VAE's factor "
                             f"{self.codec.downsample}")
        self.latent_channels = self.codec.latent_channels
        self.latent_grid = cfg.image_size // self.codec.downsample
        self.mar = MAR(cfg.mar, self.latent_channels, cfg.head)
        self.proj_in = _mlp(cfg.mar.width, q.hidden_size, q.hidden_size)
        self.proj_out = _mlp(q.hidden_size, q.hidden_size, cfg.mar.width)
        freeze_except(self, MODULES, cfg.trainable)
        self.codec.requires_grad_(False)

        self.tokenizer = load_tokenizer(cfg.tokenizer or None, q.vocab_size)
        if self.tokenizer.vocab_size > q.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the LLM only {q.vocab_size}")
        # Harmon's official RecA prompt (Harmon/src/datasets/text2image/text2image.py:473-485):
        # INSTRUCTION.format(input=...) tokenised whole, the image inserted after the first three
        # ids, so no newline between the visual tokens and the instruction. A pooled instruction
        # is given as "\n{prompt}", so "user\n\n" ends in one "\n\n" token (Qwen: 271) before the
        # image; the fixed "Generate an image." is not, so one "\n" (198). Its image-to-text
        # prompt keeps the question on its own line.
        self.template = PromptTemplate(
            text="<|im_start|>user\n{image}{instruction}<|im_end|>\n<|im_start|>assistant\n",
            pooled_text="<|im_start|>user\n\n{image}{instruction}<|im_end|>\n<|im_start|>assistant\n")
        self.caption_template = PromptTemplate(  # xtuner's qwen_chat: SEP "\n" between turns, not scored
            text="<|im_start|>user\n{image}\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
            next_turn="\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
        self.views = ViewSpec(und_size=cfg.image_size, und_mean=(0.5, 0.5, 0.5), und_std=(0.5, 0.5, 0.5),
                              gen_size=cfg.image_size, gen_resize="stretch")
        self.caption_views = dataclasses.replace(self.views, gen_resize="pad")  # image-to-text: grey-padded
        self.num_visual_tokens = self.latent_grid**2 + cfg.mar.buffer_size
        # Token slots of the training generation pass (encoder and LLM): every kept token fits.
        self.gen_slots = max_kept(self.latent_grid**2, cfg.mask_ratio_min)
        self.image_token_id = self.tokenizer.token_id(self.template.image_token)
        # the visual prompt's gradient x 0.1 (Harmon), written over the placeholders in the forward
        self.conditioning = Conditioning(self.llm.model.embed_tokens, self.ops, self.image_token_id,
                                         cfg.visual_grad_scale)

    # --- the pieces of RecaModule's objectives -------------------------------------------------
    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """Understanding view [B, 3, H, W] in [-1, 1] -> [B, T + nb, D]: the MAR encoder over all
        latents, buffers moved to the end, through proj_in (the 0.1 gradient scale: `conditioning`)."""
        return self._visual_prompt(self.make_target(und))

    def encode_views(self, und: torch.Tensor, gen: torch.Tensor, generator: torch.Generator | None = None):
        """(visual prompt, target latents) with ONE VAE pass when the loader hands the same
        tensor as both views (`ViewSpec.same_pixels`: Harmon's prompt is the image's own latents)."""
        target = self.make_target(gen, generator)
        return self._visual_prompt(target if und is gen else self.make_target(und)), target

    def _visual_prompt(self, x: torch.Tensor) -> torch.Tensor:
        nb = self.mar.buffer_size
        z = self.proj_in(self.mar.encode(x))
        return torch.cat([z[:, nb:], z[:, :nb]], dim=1)

    @torch.no_grad()
    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latent tokens x0 [B, T, C] (float32, raster order)."""
        return patchify(self.codec.encode(gen.float(), generator=generator), 1).float()

    def generation_loss(self, prompt_embeds, prompt: PromptBatch, target, generator=None) -> LossOutput:
        x0 = target
        mask, _, ratio = random_masking(x0.shape[0], x0.shape[1], generator, x0.device,
                                        self.cfg.mask_ratio_min, self.cfg.mask_ratio_std)
        z = self.condition_tokens(prompt_embeds, prompt, x0, ~mask, self.gen_slots)
        loss = self.mar.diffloss.loss(z, x0, mask, self.ops, generator)
        return LossOutput(loss=loss, metrics={"mask_ratio": ratio.detach().float().squeeze()})

    @torch.no_grad()
    def sample(self, prompt_embeds, prompt: PromptBatch, steps: int, generator=None) -> torch.Tensor:
        """MAR's iterative unmasking: `steps` rounds, cosine schedule of the masked count, a random
        order per sample, each round's tokens drawn by the head's respaced DDPM
        (`head.sample_steps`). No classifier-free guidance. -> [B, 3, H, W] in [-1, 1]."""
        b, dev = prompt_embeds.shape[0], prompt_embeds.device
        t, steps = self.latent_grid**2, max(1, steps)
        tokens = torch.zeros(b, t, self.latent_channels, device=dev)
        orders = random_orders(b, t, generator, dev)
        mask = torch.ones(b, t, dtype=torch.bool, device=dev)
        masked = t
        for step in range(steps):
            z = self.condition_tokens(prompt_embeds, prompt, tokens, ~mask, t)  # late rounds keep most tokens
            if step == steps - 1:
                predict, nxt = mask, torch.zeros_like(mask)
            else:
                masked = max(1, min(masked - 1, math.floor(t * math.cos(math.pi / 2 * (step + 1) / steps))))
                nxt = mask_by_order(orders, masked)
                predict = mask & ~nxt
            drawn = self.mar.diffloss.sample(z.flatten(0, 1), self.cfg.head.sample_steps, generator,
                                             self.cfg.sample_temperature, self.cfg.sample_clip)
            tokens = torch.where(predict[..., None], drawn.view_as(tokens), tokens)
            mask = nxt
        return self.decode_target(tokens)

    def decode_target(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent tokens [B, T, C] -> images [B, 3, H, W] in [-1, 1]."""
        z = unpatchify(x0.float(), 1, self.latent_channels, self.latent_grid)
        return self.codec.decode(z).float().clamp(-1, 1)

    # --- Harmon internals -----------------------------------------------------------------------
    def condition_tokens(self, prompt_embeds, prompt: PromptBatch, x0: torch.Tensor, keep: torch.Tensor,
                         slots: int):
        """Prompt [B, P, D] + latent tokens x0 [B, T, C] of which `keep` [B, T] are visible ->
        per-token conditions z [B, T, W] for the head. The kept tokens travel in `slots` fixed
        slots (`reca.models.harmon.mar.kept_slots`; at least the most a row keeps) through the encoder,
        the LLM (prompt | slots | buffers) and back; nothing of a dropped token reaches z."""
        b, p, _ = prompt_embeds.shape
        nb, t = self.mar.buffer_size, x0.shape[1]
        idx, valid = kept_slots(keep, slots)
        x_enc = self.mar.encode(x0, (idx, valid))  # [B, nb + K, W], buffers first
        z = self.proj_in(x_enc)
        z = torch.cat([z[:, nb:], z[:, :nb]], dim=1).to(prompt_embeds.dtype)  # buffers last, as Harmon
        keys = torch.cat([prompt.mask, valid, valid.new_ones(b, nb)], dim=1)
        hidden = self.llm_hidden(torch.cat([prompt_embeds, z], dim=1), keys)[:, p:]
        hidden = torch.cat([hidden[:, -nb:], hidden[:, :-nb]], dim=1)  # buffers back in front
        return self.mar.decode(x_enc + self.proj_out(hidden).to(x_enc.dtype), (idx, valid), t)

    def llm_hidden(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, L, D] of the LLM over embeds [B, L, D] under a causal mask
        where only `valid` [B, L] positions are keys; positions count the valid tokens only.

        Each row is packed first (its valid tokens to the front, in order; Harmon's right-padded
        sequence) and unpacked after: the attention is then plain causal with no mask, which SDPA
        runs as flash attention with native GQA (a mask would force the slower kernel and
        repeat K/V per query group). Outputs at non-valid positions are meaningless."""
        b, n, d = embeds.shape
        ar = torch.arange(n, device=valid.device)
        order = (ar + (~valid).long() * n).argsort(dim=1)  # valid first, each group in order
        packed = embeds.gather(1, order[..., None].expand(b, n, d))
        # A {layer type: None} mask skips transformers' mask building, whose packed-sequence
        # check reads a value back to the host (a sync: CUDA-graph capture would fail).
        no_mask = dict.fromkeys(self.llm.config.layer_types)
        out = self.llm.model(inputs_embeds=packed, attention_mask=no_mask, use_cache=False).last_hidden_state
        return out.gather(1, order.argsort(dim=1)[..., None].expand(b, n, out.shape[-1]))

    def caption_loss(self, batch: CaptionBatch, generator: torch.Generator | None = None) -> LossOutput:
        """Image-to-text cross-entropy on answer tokens only: the visual prompt of `batch.und`
        (grey-padded, `caption_views`) in the caption template's question prompt [B, P], then the
        answer [B, A] (right-padded). Answer token j is predicted from the token before it: the
        last valid prompt token for j = 0. Logits are never materialised (`ops.linear_cross_entropy`)."""
        prompt_embeds = self.conditioning(batch.prompt.input_ids, self.encode_visual_prompt(batch.und))
        prompt_mask, answer_ids, answer_mask = batch.prompt.mask, batch.answer_ids, batch.answer_mask
        b, p, d = prompt_embeds.shape
        a = answer_ids.shape[1]
        answers = F.embedding(answer_ids, self.llm.model.embed_tokens.weight).to(prompt_embeds.dtype)
        hidden = self.llm_hidden(torch.cat([prompt_embeds, answers], dim=1), torch.cat([prompt_mask, answer_mask], 1))
        j = torch.arange(a, device=answer_ids.device)[None]
        src = torch.where(j == 0, prompt_mask.long().sum(1, keepdim=True) - 1, p + j - 1)  # [B, A]
        h = hidden.gather(1, src[..., None].expand(b, a, d))
        scored = batch.targets()  # a conversation's later questions are seen, not scored
        targets = answer_ids.masked_fill(~scored, -100)
        loss = self.ops.linear_cross_entropy(h.flatten(0, 1), self.llm.lm_head.weight, targets.flatten(),
                                             ignore_index=-100)  # lm_head is the embedding when tied
        return LossOutput(loss=loss, metrics={"caption_tokens": scored.sum().detach().float()})

    def codec_passes(self, same_pixels: bool) -> int:
        """VAE passes per RecA sample: one when the loader hands the same tensor as both views."""
        return 1 if same_pixels else 2

    def flop_plan(self, prompt_len: float, useful: bool = False) -> list:
        """Tokens per sample of each module in one training micro-batch (`reca.engine.bench.flops`):
        the MAR encoder over nb + T (visual prompt) and nb + K (kept slots), proj_in on both, the
        LLM body over prompt | K slots | nb buffers, proj_out and decoder_embed on nb + K, the
        decoder over nb + T, the head over T tokens x batch_mul. As executed (default), K is the
        slot count and padding costs FLOPs like any token; `useful` counts the model's work
        only: K the mean kept count, the head on the masked tokens (the caller passes the mean
        valid prompt length)."""
        t, nb, m, mul = self.latent_grid**2, self.mar.buffer_size, self.cfg.mar, self.cfg.head.batch_mul
        k = expected_kept(t, self.cfg.mask_ratio_min, self.cfg.mask_ratio_std) if useful else self.gen_slots
        llm = self.llm.config
        seq = prompt_len + k + nb
        return [
            Stage("mar.z_proj", t + k),
            Stage("mar.encoder_blocks", nb + t, m.encoder_depth, nb + t, m.width),
            Stage("mar.encoder_blocks", nb + k, m.encoder_depth, nb + k, m.width),
            Stage("proj_in", 2 * nb + t + k),
            Stage("llm.model", seq, llm.num_hidden_layers, seq, llm.hidden_size),
            Stage("proj_out", nb + k),
            Stage("mar.decoder_embed", nb + k),
            Stage("mar.decoder_blocks", nb + t, m.decoder_depth, nb + t, m.width),
            Stage("mar.diffloss", (t - k if useful else t) * mul),
        ]

    def no_weight_decay_modules(self) -> tuple[str, ...]:
        """Parameter-name prefixes exempt from weight decay besides 1-D tensors and biases (spec:
        the diffusion head)."""
        return ("mar.diffloss.",)

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per part, the head apart from the rest of MAR (`reca info` lists children)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        head = count(self.mar.diffloss)
        return {"llm": count(self.llm), "proj_in": count(self.proj_in), "proj_out": count(self.proj_out),
                "mar (encoder, decoder, tables)": count(self.mar) - head, "mar.diffloss (head)": head,
                "codec": count(self.codec)}

    # --- weights ------------------------------------------------------------------------------
    def load_pretrained(self, directory: str) -> dict[str, int]:
        """Harmon checkpoint / Qwen2.5 directory / KL-16 VAE from `directory` (`reca.models.harmon.weights`)."""
        from reca.models.harmon.weights import load_pretrained

        return load_pretrained(self, directory)

    def export(self, path: str) -> None:
        """Write the weights in Harmon's checkpoint layout (`.pth` or `.safetensors`)."""
        from reca.models.harmon.weights import export_harmon

        export_harmon(self, path)
