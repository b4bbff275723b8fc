"""BAGEL family (Mixture-of-Transformers, rectified flow) with BAGEL-7B-MoT's module names.

Understanding: SigLIP NaViT (second-to-last layer + post-LN) -> `connector` (fc1, GELU-tanh,
fc2) + `vit_pos_embed` (fixed 2-D sin-cos) -> the understanding expert. Generation: FLUX-VAE
latents in 2 x 2 patches (h, w, p, q, c order) -> `vae2llm` + `time_embedder(t)` +
`latent_pos_embed` -> the generation expert -> `llm2vae` = velocity. One micro-batch is ONE
packed sequence (`reca.models.bagel.pack`): vit split (full), text split (causal, dropped with
p 0.1), latent split (noise), several samples per pack, fixed length.

Loss [R: FAMILY_FACTS A8]: t = sigmoid(randn) per image (shift 1.0 in training, 3.0 when
sampling), x_t = (1 - t) x0 + t eps, target eps - x0, MSE averaged over channels and normalised
by the number of latent tokens: `ops.flow_matching_loss` (the mean over all elements) is exactly
that for one process, and under torchrun too: every image is resized to `gen_size`, so every
rank's micro-batch holds the same number of latent tokens and the engine's mean over ranks of
the per-rank means is BAGEL's division by the all-reduced global count. `latent_token_fraction`
is where a pack of variable-resolution images would put local / global x world size.

Frozen (BAGEL's RecA run, A9): VAE, ViT, connector and, with `freeze_und`, the understanding
expert, `embed_tokens` and `lm_head` (requires_grad False: no gradient, no optimizer state,
unlike BAGEL's trainer, which detaches them but still gives them AdamW state). Trained: every
`*_moe_gen` weight, `norm_moe_gen`, `time_embedder`, `vae2llm`, `llm2vae`.

Departures from BAGEL: the pack is stored in expert order (pack.py); the fixed sin-cos tables
follow MAE's convention (column coordinate in the first half: BAGEL's modeling_utils is
MAE's code [R], the halves' order inferred [I]); sampling recomputes the prefix every step
(no KV cache) and uses no classifier-free guidance; CPU training attends through a dense
boolean mask from the same mask_mod (flex attention has no CPU backward in torch 2.13).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from reca.kernels import KernelOps, get_ops
from reca.models.adapter import LossOutput, ReconBatch, SampleBatch, PromptTemplate, ViewSpec
from reca.models.base import Conditioning, RecaModule
from reca.models.bagel.mot import Qwen2MoTForCausalLM
from reca.models.flops import Stage
from reca.models.bagel.pack import attention_mask, build_pack
from reca.models.bagel.siglip import SiglipNaViT, VitShape, grid_ids, patchify_hwpqc, unpatchify_hwpqc
from reca.models.layers import MLPConnector, Qwen2Shape, TimestepEmbedder, sincos_2d
from reca.models.tokenizer import load_tokenizer
from reca.models.vae import VAEConfig, build_codec

ATTENTION = ("auto", "flex", "dense")


@dataclass(kw_only=True)
class BagelConfig:
    family: str = "bagel"
    llm: Qwen2Shape = field(default_factory=Qwen2Shape)
    vit: VitShape = field(default_factory=VitShape)
    vae: VAEConfig = field(default_factory=VAEConfig)
    gen_size: int = 32  # generation view side, pixels (RecA BAGEL: 512-1024)
    latent_patch: int = 2
    max_latent_size: int = 8  # latent sin-cos table side, in tokens (RecA BAGEL: 64)
    timestep_dim: int = 256
    time_shift: float = 1.0  # training
    sample_shift: float = 3.0  # previews and `reca sample` (BAGEL's inference)
    text_dropout: float = 0.1  # the whole text split dropped, never the image
    freeze_und: bool = True  # BAGEL's --freeze_und: connector + understanding expert frozen
    attention: str = "auto"  # auto: flex on accelerators, dense bool mask on CPU | flex | dense
    pack_multiple: int = 128  # pack length rounded to the flex block size
    tokenizer: str = ""  # a local HF tokenizer directory (Qwen2); empty = reca's tiny byte-level BPE


class PositionEmbedding(nn.Module):
    """A fixed 2-D sin-cos table (`pos_embed` [side^2, D], not in the state dict: BAGEL pops it on load)."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        table = sincos_2d(dim, side)
        self.register_buffer("pos_embed", torch.cat([table[:, dim // 2:], table[:, : dim // 2]], 1), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


class BagelModel(RecaModule):
    """RecA adapter (`reca.models.adapter.RecaAdapter`) for BAGEL."""

    objectives = frozenset({"recon", "sample"})
    capabilities = frozenset({"init_from", "export", "flop_plan"})
    text_prompt_keeps_image = True  # generate() drops the vit split by position: text-only prompts keep its slots

    def __init__(self, cfg: BagelConfig, ops: KernelOps | None = None):
        super().__init__()
        if cfg.attention not in ATTENTION:
            raise ValueError(f"model.attention must be one of {', '.join(ATTENTION)}, got {cfg.attention!r}")
        self.cfg, self.ops = cfg, ops or get_ops("torch")
        q, v = cfg.llm, cfg.vit
        self.language_model = Qwen2MoTForCausalLM(q)
        self.vit_model = SiglipNaViT(v)
        self.connector = MLPConnector(v.hidden_size, q.hidden_size)
        self.vit_pos_embed = PositionEmbedding(v.max_side, q.hidden_size)
        self.codec = build_codec(cfg.vae)
        self.latent_channels = self.codec.latent_channels
        self.latent_grid = cfg.gen_size // self.codec.downsample // cfg.latent_patch
        if self.latent_grid > cfg.max_latent_size or cfg.gen_size % (self.codec.downsample * cfg.latent_patch):
            raise ValueError(f"gen_size {cfg.gen_size} must be a multiple of {self.codec.downsample * cfg.latent_patch} "
                             f"with at most max_latent_size {cfg.max_latent_size} tokens a side")
        token_dim = self.latent_channels * cfg.latent_patch**2
        self.time_embedder = TimestepEmbedder(q.hidden_size, cfg.timestep_dim, scale=1.0)  # t in (0, 1) as is
        self.vae2llm = nn.Linear(token_dim, q.hidden_size)
        self.llm2vae = nn.Linear(q.hidden_size, token_dim)
        nn.init.zeros_(self.llm2vae.weight)  # BAGEL zero-initialises the velocity head
        nn.init.zeros_(self.llm2vae.bias)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, q.hidden_size)
        self._freeze()

        self.tokenizer = load_tokenizer(cfg.tokenizer or None, q.vocab_size)
        if self.tokenizer.vocab_size > q.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the LLM only {q.vocab_size}")
        # vit split, then the text split; no roles, no system prompt (BAGEL's RecA plan)
        self.template = PromptTemplate(text="<|vision_start|>{image}<|vision_end|><|im_start|>{instruction}<|im_end|>")
        self.views = ViewSpec(und_size=v.image_size, und_mean=(0.5, 0.5, 0.5), und_std=(0.5, 0.5, 0.5),
                              gen_size=cfg.gen_size, gen_resize="crop")
        self.num_visual_tokens = (v.image_size // v.patch_size) ** 2
        self.vit_split = self.num_visual_tokens + 2
        self.image_token_id = self.tokenizer.token_id(self.template.image_token)
        self.conditioning = Conditioning(self.language_model.model.embed_tokens, self.ops, self.image_token_id)
        extra = [self.tokenizer.token_id(t) for t in ("<|vision_start|>", "<|vision_end|>", self.template.pad_token)]
        self.register_buffer("_extra_ids", torch.tensor(extra), persistent=False)  # vae markers, padding

    def _freeze(self) -> None:
        self.codec.requires_grad_(False)
        self.vit_model.requires_grad_(False)
        lm = self.language_model
        lm.lm_head.requires_grad_(False)  # no text loss in RecA
        und = self.cfg.freeze_und
        for name, p in lm.model.named_parameters():
            if "_moe_gen" not in name:
                p.requires_grad_(not und)
        self.connector.requires_grad_(not und)
        for layer in lm.model.layers:
            layer.self_attn.detach_und = und

    # --- RecA -----------------------------------------------------------------------------------
    def recon_loss(self, batch: ReconBatch, generator: torch.Generator | None = None) -> LossOutput:
        """One packed micro-batch: B images, their visual prompts, their instructions."""
        visual = self.encode_visual_prompt(batch.und)
        x0 = self.make_target(batch.gen, generator)
        b, dev = x0.shape[0], x0.device
        keep_text = torch.rand(b, device=dev, generator=generator) >= self.cfg.text_dropout
        t = self._shift(torch.sigmoid(torch.randn(b, device=dev, generator=generator)), self.cfg.time_shift)
        noise = torch.randn(x0.shape, device=dev, generator=generator, dtype=x0.dtype)
        x_t = self.ops.flow_matching_noise(x0, noise, t)
        pack, mask, und = self._prefix(visual, batch.prompt, keep_text)
        pred = self.velocity(pack, mask, und, x_t, t)
        loss = self.ops.flow_matching_loss(pred, x0, noise) * self.latent_token_fraction()
        return LossOutput(loss=loss, metrics={"t_mean": t.mean().detach(),
                                              "text_kept": keep_text.float().mean().detach()})

    def latent_token_fraction(self) -> float:
        """local / global latent tokens x world size (BAGEL: `mse.mean(-1).sum() * world /
        total_tokens`): 1 while every rank's images share one size (the module docstring)."""
        return 1.0

    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hu, Wu] -> [B, N, D]: connector(ViT) + the ViT sin-cos table."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_und):
            feats = self.vit_model(und)
            side = und.shape[-1] // self.cfg.vit.patch_size
            return self.connector(feats) + self.vit_pos_embed(grid_ids(side, self.cfg.vit.max_side, und.device))

    @torch.no_grad()
    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, Hg, Wg] in [-1, 1] -> x0 [B, T, p p C] (float32; the VAE posterior sampled)."""
        return patchify_hwpqc(self.codec.encode(gen.float(), generator=generator), self.cfg.latent_patch).float()

    def _prefix(self, visual, prompt, keep_text):
        """Pack, attention mask and understanding embeddings xu [Su, D] of a micro-batch."""
        ids, b = prompt.input_ids, prompt.input_ids.shape[0]
        pack = build_pack(prompt.mask, self.vit_split, self.latent_grid**2, keep_text,
                          keep_vit=visual is not None, multiple=self.cfg.pack_multiple)
        embed = self.language_model.model.embed_tokens
        rows = self.conditioning(ids, visual) if visual is not None else embed(ids)  # [B, P, D]
        extra = embed(self._extra_ids).to(rows.dtype)
        rows = torch.cat([rows, extra[None, :2].expand(b, -1, -1)], 1).flatten(0, 1)
        und = torch.cat([rows, extra[2:]])[pack.src]
        return pack, attention_mask(pack, self._attention_kind(ids.device)), und

    def _attention_kind(self, device: torch.device) -> str:
        if self.cfg.attention != "auto":
            return self.cfg.attention
        return "dense" if device.type == "cpu" else "flex"

    def velocity(self, pack, mask, und: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noised latent tokens x_t [B, T, p p C] at t [B], after the packed prefix -> velocity [B, T, p p C]."""
        b, n = x_t.shape[:2]
        w = self.vae2llm.weight
        ids = grid_ids(self.latent_grid, self.cfg.max_latent_size, x_t.device)
        gen = self.vae2llm(x_t.to(w.dtype)) + self.time_embedder(t)[:, None] + self.latent_pos_embed(ids).to(w.dtype)
        _, hg = self.language_model(und.to(gen.dtype), gen.flatten(0, 1), pack.rope, mask)
        return self.llm2vae(hg).view(b, n, -1)

    # --- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: SampleBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler integration from noise (t = 1) to data (t = 0), time shift `sample_shift`, the
        whole text kept -> images [B, 3, Hg, Wg] in [-1, 1]. Without `batch.und` the vit split is
        left out (a text-only prompt, RecA's inference)."""
        ids = batch.prompt.input_ids
        b, dev = ids.shape[0], ids.device
        visual = self.encode_visual_prompt(batch.und) if batch.und is not None else None
        pack, mask, und = self._prefix(visual, batch.prompt, torch.ones(b, dtype=torch.bool, device=dev))
        x = torch.randn(b, self.latent_grid**2, self.llm2vae.out_features, device=dev, generator=generator)
        ts = self._shift(torch.linspace(1.0, 0.0, batch.steps + 1, device=dev), self.cfg.sample_shift)
        for i in range(batch.steps):
            x = x + (ts[i + 1] - ts[i]) * self.velocity(pack, mask, und, x, ts[i].expand(b)).float()
        return self.decode_target(x)

    def decode_target(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent tokens [B, T, p p C] -> images [B, 3, Hg, Wg]."""
        z = unpatchify_hwpqc(x0.float(), self.cfg.latent_patch, self.latent_channels, self.latent_grid)
        return self.codec.decode(z).clamp(-1, 1)

    @staticmethod
    def _shift(t: torch.Tensor, s: float) -> torch.Tensor:
        return t if s == 1.0 else s * t / (1 + (s - 1) * t)

    # --- weights and counts ---------------------------------------------------------------------
    def flop_plan(self, prompt_len: float, useful: bool = False) -> list[Stage]:
        """Tokens per sample of each module (`reca.engine.bench.flops`): the ViT and connector on
        N tokens; in every layer the understanding expert's projections and MLP on the prompt
        + 2 markers, the generation expert's on the T latents; one shared attention per layer
        over the sample's tokens (flex skips the other samples' blocks); vae2llm/llm2vae on T.
        The lm_head never runs. `useful` changes only the prompt length the caller passes."""
        q, n, t = self.cfg.llm, self.num_visual_tokens, self.latent_grid**2
        und, vit = prompt_len + 2, self.cfg.vit
        plan = [Stage("vit_model", n, vit.num_layers - 1, n, vit.hidden_size), Stage("connector", n)]
        for i in range(q.num_layers):
            pre = f"language_model.model.layers.{i}."
            for suffix, tokens in (("", und), ("_moe_gen", t)):
                plan += [Stage(pre + f"self_attn.{x}_proj{suffix}", tokens) for x in "qkvo"]
                plan.append(Stage(pre + "mlp" + suffix, tokens))
        plan.append(Stage("language_model.model.layers", 0, q.num_layers, und + t, q.hidden_size))
        return plan + [Stage("time_embedder", 1), Stage("vae2llm", t), Stage("llm2vae", t)]

    def load_pretrained(self, directory: str) -> dict[str, int]:
        from reca.models.bagel.weights import load_bagel

        return load_bagel(self, directory)

    def export(self, path: str) -> None:
        """The trained weights in BAGEL's layout (`model.safetensors`-style; see weights.py)."""
        from reca.models.bagel.weights import export_bagel

        export_bagel(self, path)

    def parameter_breakdown(self) -> dict[str, int]:
        lm = self.language_model.model
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        experts = {"und": 0, "gen": 0}
        for layer in lm.layers:
            for name, p in layer.named_parameters():
                experts["gen" if "_moe_gen" in name else "und"] += p.numel()
        return {
            "llm": count(self.language_model.parameters()),
            "und expert (+ norm)": experts["und"] + count(lm.norm.parameters()),
            "gen expert (+ norm_moe_gen)": experts["gen"] + count(lm.norm_moe_gen.parameters()),
            "embed_tokens": count(lm.embed_tokens.parameters()),
            "lm_head": count(self.language_model.lm_head.parameters()),
            "vit": count(self.vit_model.parameters()),
            "connector": count(self.connector.parameters()),
            "time_embedder": count(self.time_embedder.parameters()),
            "vae2llm + llm2vae": count(self.vae2llm.parameters()) + count(self.llm2vae.parameters()),
            "vae": count(self.codec.parameters()),
        }
