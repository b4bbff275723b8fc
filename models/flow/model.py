"""Flow-matching family in BAGEL's style, with one shared-weight LLM backbone.

Understanding: SigLIP (second-to-last layer + post layer norm) -> MLP connector + fixed 2-D
sin-cos positions -> visual prompt at LLM width. Generation: VAE latents cut into p x p patches
-> linear in + timestep embedding + 2-D sin-cos positions -> Qwen2 (fed `inputs_embeds`) ->
linear out = velocity; rectified-flow loss with logit-normal t. The sequence is

    prompt (visual tokens, full attention among them; text causal; padding masked)
    <|vision_start|> noised latent tokens <|vision_end|>   (they see the whole prompt and
                                                            each other; nothing attends to them)

The Mixture-of-Transformers split (separate understanding and generation experts) belongs to
the BAGEL family; here `trainable` chooses which modules learn.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import Qwen2Model, SiglipVisionConfig, SiglipVisionModel

from reca.kernels import KernelOps, get_ops
from reca.models.flops import Stage
from reca.models.adapter import LossOutput, PromptBatch, PromptTemplate, ViewSpec
from reca.models.base import Conditioning, RecaModule
from reca.models.layers import (MLPConnector, Qwen2Shape, TimestepEmbedder, freeze_except,
                                patchify, sincos_2d, unpatchify)
from reca.models.tokenizer import load_tokenizer
from reca.models.vae import VAEConfig, build_codec

MODULES = ("vit", "connector", "llm", "gen_in", "time_embed", "gen_out")


@dataclass(kw_only=True)
class SiglipShape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2  # of the full encoder: the last one is never built (second-to-last features)
    num_heads: int = 2
    image_size: int = 32
    patch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")


@dataclass(kw_only=True)
class FlowConfig:
    family: str = "flow"
    llm: Qwen2Shape = field(default_factory=Qwen2Shape)
    vit: SiglipShape = field(default_factory=SiglipShape)
    vae: VAEConfig = field(default_factory=VAEConfig)
    gen_size: int = 32  # generation view side, pixels
    latent_patch: int = 2  # latents per token along a side
    timestep_dim: int = 256
    time_shift: float = 1.0  # t -> s t / (1 + (s - 1) t) when training
    sample_shift: float = 1.0  # the same at sampling (BAGEL: 3.0)
    visual_grad_scale: float = 1.0
    trainable: tuple[str, ...] = ("connector", "llm", "gen_in", "time_embed", "gen_out")
    tokenizer: str = ""  # a local HF tokenizer directory; empty = reca's tiny byte-level BPE


class FlowModel(RecaModule):
    """RecA adapter (see `reca.models.adapter.RecaAdapter`) for the flow-matching family."""

    objectives = frozenset({"recon", "sample"})
    capabilities = frozenset({"init_from", "export", "flop_plan"})

    def __init__(self, cfg: FlowConfig, ops: KernelOps | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or get_ops("torch")
        v, q = cfg.vit, cfg.llm
        self.vit = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers - 1, num_attention_heads=v.num_heads,
            image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False,
            attn_implementation="sdpa",
        ))
        self.connector = MLPConnector(v.hidden_size, q.hidden_size)
        self.llm = Qwen2Model(q.hf_config(tie_word_embeddings=False))
        self.codec = build_codec(cfg.vae)
        self.latent_channels = self.codec.latent_channels
        self.latent_grid = cfg.gen_size // self.codec.downsample // cfg.latent_patch
        token_dim = self.latent_channels * cfg.latent_patch**2
        self.gen_in = nn.Linear(token_dim, q.hidden_size)
        self.time_embed = TimestepEmbedder(q.hidden_size, cfg.timestep_dim)
        self.gen_out = nn.Linear(q.hidden_size, token_dim)
        vit_grid = v.image_size // v.patch_size
        # One frame for both grids, in generation tokens: a visual token and the latent tokens
        # covering the same pixels get the same position (BAGEL's ViT and latent patches are
        # nearly the same size, 14 vs 16 px; the tiny preset's differ by 2x).
        token_px = cfg.gen_size / self.latent_grid
        vit_step = (v.patch_size * cfg.gen_size / v.image_size) / token_px
        self.register_buffer("vit_pos", sincos_2d(q.hidden_size, vit_grid, vit_step), persistent=False)
        self.register_buffer("latent_pos", sincos_2d(q.hidden_size, self.latent_grid), persistent=False)

        freeze_except(self, MODULES, cfg.trainable)
        self.codec.requires_grad_(False)

        self.tokenizer = load_tokenizer(cfg.tokenizer or None, q.vocab_size)
        if self.tokenizer.vocab_size > q.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the LLM only {q.vocab_size}")
        self.template = PromptTemplate(text="<|vision_start|>{image}<|vision_end|><|im_start|>{instruction}<|im_end|>")
        self.text_prompt = "<|im_start|>{instruction}<|im_end|>"  # the image and its markers dropped
        self.views = ViewSpec(und_size=v.image_size, und_mean=(0.5, 0.5, 0.5), und_std=(0.5, 0.5, 0.5),
                              gen_size=cfg.gen_size, gen_resize="crop")
        self.num_visual_tokens = vit_grid**2
        self.image_token_id = self.tokenizer.token_id(self.template.image_token)
        self.conditioning = Conditioning(self.llm.embed_tokens, self.ops, self.image_token_id, cfg.visual_grad_scale)
        self._marker_ids = (self.tokenizer.token_id("<|vision_start|>"), self.tokenizer.token_id("<|vision_end|>"))

    # --- the pieces of RecaModule's objectives -------------------------------------------------
    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hu, Wu] -> [B, (Hu/patch)^2, D]."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vit.parameters())
        with torch.set_grad_enabled(grad):
            feats = self.vit(pixel_values=und).last_hidden_state  # post-LN of the second-to-last layer
        return self.connector(feats) + self.vit_pos.to(feats.dtype)

    @torch.no_grad()
    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, Hg, Wg] in [-1, 1] -> clean latent tokens x0 [B, T, C p p] (float32)."""
        z = self.codec.encode(gen.float(), generator=generator)
        return patchify(z, self.cfg.latent_patch).float()

    def generation_loss(self, prompt_embeds, prompt: PromptBatch, target, generator=None) -> LossOutput:
        x0 = target
        b = x0.shape[0]
        t = torch.sigmoid(torch.randn(b, device=x0.device, generator=generator))
        t = self._shift(t, self.cfg.time_shift)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        x_t = self.ops.flow_matching_noise(x0, noise, t)
        pred = self.velocity(prompt_embeds, prompt, x_t, t)
        loss = self.ops.flow_matching_loss(pred, x0, noise)
        return LossOutput(loss=loss, metrics={"t_mean": t.mean().detach()})

    @torch.no_grad()
    def sample(self, prompt_embeds, prompt: PromptBatch, steps: int, generator=None) -> torch.Tensor:
        """Euler integration of the velocity from noise (t = 1) to data (t = 0) -> [B, 3, Hg, Wg]."""
        b, dev = prompt_embeds.shape[0], prompt_embeds.device
        tokens = self.latent_grid**2
        x = torch.randn(b, tokens, self.gen_out.out_features, device=dev, generator=generator)
        ts = self._shift(torch.linspace(1.0, 0.0, steps + 1, device=dev), self.cfg.sample_shift)
        for i in range(steps):
            t = ts[i].expand(b)
            x = x + (ts[i + 1] - ts[i]) * self.velocity(prompt_embeds, prompt, x, t).float()
        z = unpatchify(x, self.cfg.latent_patch, self.latent_channels, self.latent_grid)
        return self.codec.decode(z).clamp(-1, 1)

    def decode_target(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent tokens [B, T, C p p] -> images [B, 3, Hg, Wg] (what the model is asked to regenerate)."""
        z = unpatchify(x0.float(), self.cfg.latent_patch, self.latent_channels, self.latent_grid)
        return self.codec.decode(z).clamp(-1, 1)

    def flop_plan(self, prompt_len: float, useful: bool = False) -> list[Stage]:
        """Tokens per sample of each module (`reca.engine.bench.flops`): ViT and connector on the
        Nv visual tokens; the LLM on the whole sequence (P prompt + T generation tokens + 2
        markers); gen_in/gen_out on the T tokens; the timestep MLP once per sample. No slots or
        masked tokens: `useful` changes nothing beyond the prompt length the caller passes."""
        nv, t = self.num_visual_tokens, self.latent_grid**2
        vit, llm = self.vit.config, self.llm.config
        seq = prompt_len + t + 2
        head_dim = llm.hidden_size // llm.num_attention_heads
        return [
            Stage("vit", nv, vit.num_hidden_layers, nv, vit.hidden_size),
            Stage("connector", nv),
            Stage("llm", seq, llm.num_hidden_layers, seq, llm.num_attention_heads * head_dim),
            Stage("gen_in", t),
            Stage("time_embed", 1),
            Stage("gen_out", t),
        ]

    def load_pretrained(self, directory: str) -> dict[str, int]:
        """Weights from a local directory (layout in `reca.models.loading`); tensors loaded per part."""
        from reca.models.loading import load_pretrained

        return load_pretrained(self, directory)

    def export(self, path: str) -> None:
        """Every tensor but the frozen VAE's, by its reca name, in one `.safetensors` file: the
        family has no other code base, and `--init-from DIR` reads DIR/model.safetensors back."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()
                 if not k.startswith("codec.")}
        save_file(state, path, metadata={"format": "pt"})

    # --- internals ---------------------------------------------------------------------------
    @staticmethod
    def _shift(t: torch.Tensor, s: float) -> torch.Tensor:
        return t if s == 1.0 else s * t / (1 + (s - 1) * t)

    def velocity(self, prompt_embeds, prompt: PromptBatch, x_t, t) -> torch.Tensor:
        """Prompt [B, P, D] + noised latent tokens [B, T, Cpp] at time t [B] -> velocity [B, T, Cpp]."""
        b, p, _ = prompt_embeds.shape
        n = x_t.shape[1]
        w = self.llm.embed_tokens.weight
        gen = self.gen_in(x_t.to(w.dtype)) + self.time_embed(t)[:, None] + self.latent_pos.to(w.dtype)
        start, end = (w[i].expand(b, 1, -1) for i in self._marker_ids)
        seq = torch.cat([prompt_embeds.to(gen.dtype), start.to(gen.dtype), gen, end.to(gen.dtype)], dim=1)
        mask, pos = self._attention(prompt, n)
        hidden = self.llm(inputs_embeds=seq, attention_mask=mask, position_ids=pos,
                          use_cache=False).last_hidden_state  # no KV cache: it copies K, V every layer
        return self.gen_out(hidden[:, p + 1 : p + 1 + n])

    def _attention(self, prompt: PromptBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean mask [B, 1, L, L] (True = may attend) and position ids [B, L], L = P + n + 2.

        Visual tokens attend to each other fully, text causally, padding is never a key; the
        latent block (with its two markers) sees the prompt and itself. All latent tokens share
        one rotary position (their 2-D position is in the sin-cos table), as BAGEL does.
        """
        ids, valid = prompt.input_ids, prompt.mask
        b, p = ids.shape
        dev = ids.device
        group = torch.where(ids == self.image_token_id, 1, 0)
        group = torch.cat([group, torch.full((b, n + 2), 2, device=dev, dtype=group.dtype)], dim=1)
        key_ok = torch.cat([valid, torch.ones(b, n + 2, device=dev, dtype=torch.bool)], dim=1)
        idx = torch.arange(p + n + 2, device=dev)
        causal = idx[None, :, None] >= idx[None, None, :]
        same = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] > 0)
        diag = torch.eye(p + n + 2, device=dev, dtype=torch.bool)[None]  # pad rows see themselves: no NaN
        mask = ((causal | same) & key_ok[:, None, :]) | diag

        length = valid.sum(1, keepdim=True)
        prompt_pos = (valid.cumsum(1) - 1).clamp_min(0)
        gen_pos = torch.cat([length, (length + 1).expand(b, n), length + 2], dim=1)
        return mask[:, None], torch.cat([prompt_pos, gen_pos], dim=1)
