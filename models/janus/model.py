"""Janus-Pro family (AR over discrete image codes, decoupled visual encoders) on transformers'
own `JanusForConditionalGeneration`, used as it is: SigLIP-L/16 + aligner for understanding,
a VQ-16 model (codebook 16,384, /16) + generation embeddings, aligner and head for generation,
one DeepSeek-LLM (Llama) between them. RecA here:

    recon   <bos><|User|>: <begin_of_image>{Nv visual tokens}<end_of_image>\\n{instruction}\\n\\n
            <|Assistant|>:<begin_of_image>, then the image's N VQ codes (the generation view's own)
            through `generation_embeddings` -> `generation_aligner`, teacher-forced: the generation
            head's cross-entropy over the codebook at the N positions that predict them (the
            prompt's last token predicts the first code). The visual prompt is Janus's
            understanding path (SigLIP's last layer with its post-norm -> aligner, at LLM width),
            written over the placeholders. With probability `cfg_dropout` a row is the
            unconditional prompt classifier-free guidance samples with: every token but
            <bos> and <begin_of_image> the pad token, no visual prompt (generation_inference.py:
            `tokens[i, 1:-1] = pad_id`; transformers' generate: neither BOS nor BOI -> pad).
    caption image-to-text through the same LLM and its lm_head (tied to the embedding table when
            `tie_word_embeddings`): Janus's understanding conversation, "<|Assistant|>: {answer}
            <｜end▁of▁sentence｜>", next-token cross-entropy on the answer.
    sample  `generate(generation_mode="image")` of transformers, code for code (`sampling.py`).

Both views are 384 px for Janus-Pro: the understanding input is SigLIP's own size (RecA's
bottleneck rule: never a larger understanding view than the family's encoder takes), the
generation view VQ-16's 24 x 24 codes; both show the same crop, so one tensor serves both.
Frozen: SigLIP and the VQ model (Janus-Pro keeps its generation encoder frozen in every stage;
RecA's reproduction guide freezes the understanding components of decoupled-encoder models).
Shapes: B batch, P prompt, Nv visual tokens, N codes, D LLM width, K codebook, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import JanusConfig as HFJanusConfig
from transformers import JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

from reca.kernels import KernelOps, get_ops
from reca.models.adapter import CaptionBatch, LossOutput, PromptBatch, PromptTemplate, ReconBatch, ViewSpec
from reca.models.base import Conditioning, RecaModule
from reca.models.janus.vocab import ASSISTANT, BOI, BOS, EOI, EOS, IMAGE, PAD, SPECIALS, USER, check_tokenizer
from reca.models.tokenizer import load_tokenizer

# JanusProcessor's default system prompt of image-to-text (processing_janus.py; the converted
# releases set use_default_system_prompt); text-to-image prompts have none (generation_inference.py)
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
          "user provides, and assist the user with a variety of tasks using natural language.")


@dataclass(kw_only=True)
class LlamaShape:
    """DeepSeek-LLM's shape as Janus-Pro-1B's release has it (deepseek-community/Janus-Pro-1B
    text_config: Llama, 2048 wide, 24 layers, 16 heads, MLP 5632, vocabulary 102,400)."""

    vocab_size: int = 102_400  # 0: the tokenizer's size (tiny presets)
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 16_384


@dataclass(kw_only=True)
class JanusVisionShape:
    """SigLIP-Large-Patch16-384 and the understanding aligner (transformers' JanusVisionConfig
    defaults; the aligner is `depth` linear layers with GELU between, out to LLM width)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    image_size: int = 384
    patch_size: int = 16
    aligner_depth: int = 2


@dataclass(kw_only=True)
class JanusVQShape:
    """VQ-16 (LlamaGen's tokenizer; transformers' JanusVQVAEConfig defaults): codes of `embed_dim`
    channels, a /2^(levels-1) encoder and decoder; the generation aligner has `aligner_depth` layers."""

    embed_dim: int = 8
    codebook_size: int = 16_384
    latent_channels: int = 256
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    aligner_depth: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)


@dataclass(kw_only=True)
class JanusConfig:
    family: str = "janus"
    llm: LlamaShape = field(default_factory=LlamaShape)
    vision: JanusVisionShape = field(default_factory=JanusVisionShape)
    vq: JanusVQShape = field(default_factory=JanusVQShape)
    # Janus-Pro's lm_head is DeepSeek-LLM's own; transformers' JanusConfig ties it to the
    # embedding table by default (the tiny preset keeps that default)
    tie_word_embeddings: bool = False
    cfg_dropout: float = 0.1  # rows trained as the unconditional prompt (classifier-free guidance)
    guidance_scale: float = 5.0  # generation_inference.py's cfg_weight; the converted releases' generation_config
    sample_temperature: float = 1.0  # generation_inference.py samples at 1; 0 = greedy (argmax)
    trainable: tuple[str, ...] = ("language_model", "aligner", "generation_embeddings", "generation_aligner",
                                  "generation_head", "lm_head")  # SigLIP and the VQ model frozen
    tokenizer: str = ""  # a local Janus tokenizer directory; empty = reca's tiny BPE with Janus's specials


PARTS = ("vision_model", "aligner", "vqmodel", "generation_embeddings", "generation_aligner", "generation_head",
         "language_model", "lm_head")


def hf_config(cfg: JanusConfig, vocab_size: int, image_token_id: int, *, bos: int, eos: int, pad: int) -> HFJanusConfig:
    """The transformers `JanusConfig` the shapes stand for (the fields of the conversion script
    `convert_janus_weights_to_hf.py`; everything else transformers' defaults)."""
    q, v, g = cfg.llm, cfg.vision, cfg.vq
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
                       num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads, num_key_value_heads=q.num_kv_heads,
                       max_position_embeddings=q.max_position, rms_norm_eps=q.rms_norm_eps, rope_theta=q.rope_theta,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=cfg.tie_word_embeddings)
    grid = v.image_size // v.patch_size
    vision = JanusVisionConfig(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                               mlp_ratio=v.mlp_ratio, image_size=v.image_size, patch_size=v.patch_size,
                               projection_dim=q.hidden_size, depth=v.aligner_depth, num_image_tokens=grid * grid)
    vq = JanusVQVAEConfig(embed_dim=g.embed_dim, num_embeddings=g.codebook_size, latent_channels=g.latent_channels,
                          base_channels=g.base_channels, channel_multiplier=list(g.channel_multiplier),
                          num_res_blocks=g.num_res_blocks, num_hidden_layers=g.aligner_depth,
                          projection_dim=q.hidden_size, image_token_embed_dim=q.hidden_size)
    return HFJanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                         tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")


def _check(cfg: JanusConfig) -> None:
    v, g = cfg.vision, cfg.vq
    if v.image_size % v.patch_size:
        raise ValueError(f"vision.patch_size {v.patch_size} must divide vision.image_size {v.image_size}")
    if g.downsample != v.patch_size:  # transformers' Janus decodes codes on the vision grid (vq num_patches)
        raise ValueError(f"the VQ model's factor {g.downsample} (2^(levels-1)) must equal vision.patch_size "
                         f"{v.patch_size}: Janus lays its image codes on the understanding grid")
    if g.base_channels % 32:
        raise ValueError(f"vq.base_channels must be a multiple of 32 (GroupNorm of 32 groups), got {g.base_channels}")
    if not 0.0 <= cfg.cfg_dropout < 1.0 or cfg.sample_temperature < 0 or cfg.guidance_scale < 0:
        raise ValueError("cfg_dropout must be in [0, 1), sample_temperature and guidance_scale >= 0")


class JanusModel(RecaModule):
    """RecA adapter for Janus-Pro: `self.janus` is transformers' `JanusForConditionalGeneration`,
    so parameter names are the release's own behind `janus.` (`janus.model.language_model.*`,
    `janus.lm_head.weight`, ...)."""

    objectives = frozenset({"recon", "caption", "sample"})
    capabilities = frozenset({"init_from", "export"})
    # `reca sample --prompt`: Janus's own text-to-image prompt (generation_inference.py: the
    # conversation without a system prompt, then the image start tag)
    text_prompt = f"{BOS}{USER}: {{instruction}}\n\n{ASSISTANT}:{BOI}"

    def __init__(self, cfg: JanusConfig, ops: KernelOps | None = None):
        super().__init__()
        _check(cfg)
        self.cfg, self.ops = cfg, ops or get_ops("torch")
        self.tokenizer = load_tokenizer(cfg.tokenizer or None, 1024, special_tokens=SPECIALS)
        check_tokenizer(self.tokenizer)
        tid = self.tokenizer.token_id
        vocab = cfg.llm.vocab_size or self.tokenizer.vocab_size
        if max(tid(t) for t in (BOS, EOS, PAD, IMAGE, BOI, EOI)) >= vocab:
            raise ValueError(f"the tokenizer's special tokens lie past llm.vocab_size {vocab}")
        self.image_token_id = tid(IMAGE)
        self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id = (tid(t) for t in (BOS, EOS, PAD, BOI, EOI))
        self.janus = JanusForConditionalGeneration(hf_config(cfg, vocab, self.image_token_id, bos=self.bos_id,
                                                             eos=self.eos_id, pad=self.pad_id))
        parts = self.parts()
        unknown = set(cfg.trainable) - set(PARTS)
        if unknown:
            raise ValueError(f"model.trainable names unknown modules {sorted(unknown)}; known: {', '.join(PARTS)}")
        for name in PARTS:
            if name != "lm_head" or not cfg.tie_word_embeddings:  # a tied head is the embedding table
                parts[name].requires_grad_(name in cfg.trainable)
        grid = cfg.vision.image_size // cfg.vision.patch_size
        self.num_visual_tokens = self.num_codes = grid * grid
        self.latent_grid = grid  # `reca info`: N = grid^2 generation tokens
        self.conditioning = Conditioning(self.lm.embed_tokens, self.ops, self.image_token_id)
        size, half = cfg.vision.image_size, (0.5,) * 3  # Janus-Pro's processor: mean = std = 0.5
        # recon: one square crop for both views (Janus's generation data: short side to 384,
        # long side cropped); caption: the whole image padded to a square with grey (127) bands,
        # as Janus's understanding data and JanusImageProcessor (background = mean * 255)
        self.views = ViewSpec(und_size=size, und_mean=half, und_std=half, gen_size=size, gen_resize="crop")
        self.caption_views = ViewSpec(und_size=size, und_mean=half, und_std=half, gen_size=size, gen_resize="crop",
                                      und_resize="pad")
        block = f"{BOI}{{image}}{EOI}\n"
        self.template = PromptTemplate(text=f"{BOS}{USER}: {block}{{instruction}}\n\n{ASSISTANT}:{BOI}",
                                       image_token=IMAGE, pad_token=PAD, end_of_turn=EOS)
        self.caption_template = PromptTemplate(text=f"{BOS}{SYSTEM}\n\n{USER}: {block}{{instruction}}\n\n{ASSISTANT}:",
                                               image_token=IMAGE, pad_token=PAD, answer_prefix=" ", end_of_turn=EOS,
                                               next_turn=f"{USER}: {{instruction}}\n\n{ASSISTANT}:")

    @property
    def lm(self) -> nn.Module:
        """The LLM (transformers' LlamaModel: embed_tokens, layers, norm)."""
        return self.janus.model.language_model

    def parts(self) -> dict[str, nn.Module]:
        m = self.janus.model
        return {"vision_model": m.vision_model, "aligner": m.aligner, "vqmodel": m.vqmodel,
                "generation_embeddings": m.generation_embeddings, "generation_aligner": m.generation_aligner,
                "generation_head": m.generation_head, "language_model": m.language_model, "lm_head": self.janus.lm_head}

    def eval_modules(self) -> tuple[str, ...]:
        """SigLIP and the VQ model, frozen, stay in eval mode (transformers' JanusVQVAE puts itself
        in eval at construction: "Janus's VQ model is frozen")."""
        return ("janus.model.vision_model", "janus.model.vqmodel")

    def blocks(self) -> list[nn.Module]:
        """The LLM's decoder layers and SigLIP's encoder layers (compiled, checkpointed, sharded);
        the VQ model's ResNet blocks are indexed by its own forward and left whole."""
        return [*self.lm.layers, *self.janus.model.vision_model.encoder.layers]

    # --- visual prompt and target ---------------------------------------------------------------
    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hu, Wu] -> [B, Nv, D]: SigLIP's last layer (its post-norm included) -> aligner."""
        vision = self.janus.model.vision_model
        with torch.no_grad():
            feats = vision(pixel_values=und.to(vision.dtype)).last_hidden_state
        aligner = self.janus.model.aligner
        return aligner(feats.to(aligner.fc1.weight.dtype))

    @torch.no_grad()
    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, Hg, Wg] in [-1, 1] -> VQ codes [B, N] (row-major over the grid)."""
        vq = self.janus.model.vqmodel
        return vq.encode(gen.to(vq.dtype)).image_tokens.view(gen.shape[0], -1)

    def unconditional(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, P] -> the unconditional ones: all but <bos> and <begin_of_image> the pad."""
        keep = (ids == self.bos_id) | (ids == self.boi_id)
        return torch.where(keep, ids, torch.full_like(ids, self.pad_id))

    # --- objectives -----------------------------------------------------------------------------
    def recon_loss(self, batch: ReconBatch, generator: torch.Generator | None = None) -> LossOutput:
        prompt = batch.prompt
        codes = self.make_target(batch.gen, generator)
        embeds = self.conditioning(prompt.input_ids, self.encode_visual_prompt(batch.und))
        dropped = torch.rand(embeds.shape[0], device=embeds.device, generator=generator) < self.cfg.cfg_dropout
        if self.cfg.cfg_dropout > 0:
            uncond = self.lm.embed_tokens(self.unconditional(prompt.input_ids)).to(embeds.dtype)
            embeds = torch.where(dropped[:, None, None], uncond, embeds)
        z = self.code_features(embeds, prompt, codes)
        head = self.janus.model.generation_head.vision_head
        loss = self.ops.linear_cross_entropy(z.flatten(0, 1), head.weight, codes.flatten(), bias=head.bias)
        return LossOutput(loss=loss, metrics={"unconditional": dropped.float().mean()})

    def code_features(self, embeds: torch.Tensor, prompt: PromptBatch, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: prompt embeddings [B, P, D] (right-padded) + the codes [B, N] but the
        last -> the generation head's features before its last linear, [B, N, Dh], at the
        positions predicting each code. Pads are hidden and not counted in the positions, so
        the codes follow the prompt's last token as in an unpadded sequence."""
        b, p, d = embeds.shape
        n = codes.shape[1]
        images = self.janus.prepare_embeddings_for_image_generation(codes[:, :-1]).to(embeds.dtype)
        valid = torch.cat([prompt.mask, prompt.mask.new_ones(b, n - 1)], 1)
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        hidden = self.lm(inputs_embeds=torch.cat([embeds, images], 1), attention_mask=valid.long(),
                         position_ids=positions, use_cache=False).last_hidden_state
        j = torch.arange(n, device=codes.device)[None]
        src = torch.where(j == 0, prompt.mask.long().sum(1, keepdim=True) - 1, p + j - 1)  # [B, N]
        h = hidden.gather(1, src[..., None].expand(b, n, d))
        head = self.janus.model.generation_head
        return head.activation_fn(head.proj_out(h))

    def caption_loss(self, batch: CaptionBatch, generator: torch.Generator | None = None) -> LossOutput:
        """Next-token cross-entropy on the answer [B, A] after the caption prompt [B, P] (its
        visual tokens in place), causal, pads hidden and not counted in the positions."""
        prompt = batch.prompt
        b, p = prompt.mask.shape
        a = batch.answer_ids.shape[1]
        embeds = self.conditioning(prompt.input_ids, self.encode_visual_prompt(batch.und))
        answers = self.lm.embed_tokens(batch.answer_ids).to(embeds.dtype)
        valid = torch.cat([prompt.mask, batch.answer_mask], 1)
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        hidden = self.lm(inputs_embeds=torch.cat([embeds, answers], 1), attention_mask=valid.long(),
                         position_ids=positions, use_cache=False).last_hidden_state
        j = torch.arange(a, device=hidden.device)[None]
        src = torch.where(j == 0, prompt.mask.long().sum(1, keepdim=True) - 1, p + j - 1)  # [B, A]
        h = hidden.gather(1, src[..., None].expand(b, a, hidden.shape[-1]))
        targets = batch.answer_ids.masked_fill(~batch.targets(), -100)
        loss = self.ops.linear_cross_entropy(h.flatten(0, 1), self.janus.lm_head.weight, targets.flatten(),
                                             ignore_index=-100)
        return LossOutput(loss=loss, metrics={"caption_tokens": batch.targets().sum().detach().float()})

    # --- sample ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, Hg, Wg] in [-1, 1]; `batch.steps` is not used (one step per code)."""
        return self.janus.model.vqmodel.decode(self.generate_codes(batch, generator)).float().clamp(-1, 1)

    @torch.no_grad()
    def generate_codes(self, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes [B, N] (`sampling.sample_codes`): from the visual prompt of `batch.und` in the RecA
        template, or (`und` None) from the text prompt alone (`text_prompt`)."""
        from reca.models.janus.sampling import sample_codes

        ids = batch.prompt.input_ids
        if batch.und is None:
            embeds = self.lm.embed_tokens(ids)
        else:
            embeds = self.conditioning(ids, self.encode_visual_prompt(batch.und))
        return sample_codes(self, embeds, batch.prompt, generator)

    # --- engine extras --------------------------------------------------------------------------
    def parameter_breakdown(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = self.parts()
        out = {f"{name}{' (frozen)' if name not in self.cfg.trainable else ''}": count(m) for name, m in parts.items()
               if name != "lm_head"}
        lm = self.lm
        out["language_model.embed_tokens"] = count(lm.embed_tokens)
        out["language_model.layers"] = count(lm.layers)
        if self.cfg.tie_word_embeddings:
            out["lm_head (tied: embed_tokens)"] = 0
        else:
            out["lm_head"] = count(self.janus.lm_head)
        return out

    def load_pretrained(self, directory: str) -> dict[str, int]:
        """A transformers-format Janus release (`reca.models.janus.weights`)."""
        from reca.models.janus.weights import load_pretrained

        return load_pretrained(self, directory)

    def export(self, path: str) -> None:
        """`path` (model.safetensors) and, beside it, config.json and the tokenizer: a
        transformers-format release directory (`reca.models.janus.weights`)."""
        from reca.models.janus.weights import export_release

        export_release(self, path)
