"""Show-o family (AR, discrete tokens): a Phi-1.5 LLM over one vocabulary of text, special
tokens, MAGVIT-v2 image codes and a mask token (`reca.models.showo.vocab`), trained by masked
token modelling. RecA as in the authors' public Show-o code (FAMILY_FACTS.md B8):

    recon   prompt [P] (right-padded)  |  <|soi|>  N image codes, masked (cosine)  |  <|eoi|>
            CLIP: `<|mmu|><|soi|>` 576 CLIP-L/336 tokens (second-to-last layer, CLS dropped,
            no CLIP normalisation) through `mm_projector` `<|eoi|><bos>USER: \\n {instruction}
            ASSISTANT:<eos>`; VQ: `<|mmu|><|soi|>` the image's own codes at the bottleneck
            resolution `<|eoi|><bos>{instruction}<eos>`, the prompt left-padded as upstream.
            Cross-entropy over the whole vocabulary at the N code positions (no shift), masked
            positions only (`ops.linear_cross_entropy` with the lm_head bias).
    caption image-to-text (LLaVA-style), next-token cross-entropy on the answer.
    sample  MaskGIT's iterative unmasking (Show-o's `t2i_generate`, no guidance).

Attention: one boolean mask [B, 1, L, L] (`omni_mask`): causal, padding columns hidden, the
visual-prompt columns visible to every query (CLIP), and each image block bidirectional. This
is `create_attention_mask_for_mmu_vit_recon` (CLIP: the N codes) and
`create_attention_mask_predict_next_recon` (VQ: `<|soi|>`..`<|eoi|>` of each image), except that
every row also sees itself, so padding rows stay finite (nothing attends to them).
Positions are 0..L-1 including padding in recon (as upstream); in caption they count valid
tokens only, so the answer follows its prompt as in Show-o's unpadded mmu sequences.
Departures: the recon prompt's text part is padded to `max_text_tokens` plus the template
(upstream: 128 tokens in all), and the instruction is tokenised apart from the template text.
Shapes: B batch, P prompt, N codes, Nv visual tokens, D LLM width, V = vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM

from reca.kernels import KernelOps, get_ops
from reca.models.adapter import CaptionBatch, LossOutput, PromptBatch, PromptTemplate, ReconBatch, ViewSpec
from reca.models.base import Conditioning, RecaModule
from reca.models.layers import freeze_except
from reca.models.showo.codec import CodecConfig, build_image_codec
from reca.models.showo.vocab import MASK, ShowoTokenizer, VocabLayout
from reca.models.tokenizer import load_tokenizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(kw_only=True)
class PhiShape:
    """Phi-1.5's shape (transformers' PhiConfig defaults) at its real size; tiny presets shrink it."""

    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 24
    num_heads: int = 32
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10_000.0
    layer_norm_eps: float = 1e-5
    max_position: int = 2048
    # Show-o's vendored Phi turns this on in PhiForCausalLM.__init__ (models/phi.py:1088): a
    # LayerNorm over each head's queries and keys before the rotary embedding, in every layer of
    # every release (FAMILY_FACTS.md B1); transformers' default is off.
    qk_layernorm: bool = True

    def hf_config(self, vocab_size: int) -> PhiConfig:
        return PhiConfig(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                         num_key_value_heads=self.num_heads, hidden_act="gelu_new",
                         max_position_embeddings=self.max_position, layer_norm_eps=self.layer_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                                          "partial_rotary_factor": self.partial_rotary_factor},
                         resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                         qk_layernorm=self.qk_layernorm, attn_implementation="sdpa")


@dataclass(kw_only=True)
class ClipShape:
    """CLIP-ViT-L/14-336; features of the second-to-last layer, so the last is never built."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14


@dataclass(kw_only=True)
class ShowoConfig:
    family: str = "showo"
    llm: PhiShape = field(default_factory=PhiShape)
    llm_vocab_size: int = 0  # text tokens T (Show-o: 50295); 0 = the tokenizer's own size
    visual: str = "clip"  # "clip" (the published RecA numbers) | "vq" (the appendix variant)
    clip: ClipShape = field(default_factory=ClipShape)
    codec: CodecConfig = field(default_factory=CodecConfig)
    image_size: int = 32  # generation view (Show-o: 256 or 512, stretched)
    vq_input_size: int = 16  # "vq": the understanding view's side, the bottleneck (RecA: 256)
    min_masking_rate: float = 0.0
    # The public CLIP script builds the recon input embeddings under no_grad: the recon loss
    # trains the Phi layers, final norm and lm_head; embed_tokens and mm_projector learn from
    # image-to-text only. The VQ script embeds inside the model (True).
    recon_embed_grad: bool | None = None  # None: the variant's public script (vq True, clip False)
    recon_text_tokens: int = 0  # CLIP recon prompt's text part padded to this many ids (Show-o: 128); 0 = max_text_tokens
    sample_temperature: float = 1.0
    trainable: tuple[str, ...] = ("showo", "mm_projector")  # CLIP tower and image codec frozen
    tokenizer: str = ""  # a local HF tokenizer directory (Phi-1.5); empty = reca's tiny byte-level BPE


class ShowoModel(RecaModule):
    """RecA adapter for Show-o. Parameter names are Show-o's (`showo.` = PhiForCausalLM,
    `mm_projector.`), plus the frozen `clip.` (transformers CLIPVisionModel) and `vq.`."""

    objectives = frozenset({"recon", "caption", "sample"})
    capabilities = frozenset({"init_from", "export"})

    def __init__(self, cfg: ShowoConfig, ops: KernelOps | None = None):
        super().__init__()
        if cfg.visual not in ("clip", "vq"):
            raise ValueError(f"model.visual must be 'clip' or 'vq', got {cfg.visual!r}")
        self.cfg, self.ops = cfg, ops or get_ops("torch")
        self.vq = build_image_codec(cfg.codec).requires_grad_(False)
        base = load_tokenizer(cfg.tokenizer or None, 1024)
        self.layout = VocabLayout(text=cfg.llm_vocab_size or base.vocab_size, codebook=self.vq.codebook_size)
        self.tokenizer = ShowoTokenizer(base, self.layout)
        d = cfg.llm.hidden_size
        self.showo = PhiForCausalLM(cfg.llm.hf_config(self.layout.size))
        modules = ["showo"]
        if cfg.visual == "clip":
            c = cfg.clip
            self.clip = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers - 1,
                num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
                attn_implementation="sdpa")).requires_grad_(False)
            self.mm_projector = nn.Sequential(nn.Linear(c.hidden_size, d), nn.GELU(), nn.Linear(d, d))
            modules.append("mm_projector")
            self.num_visual_tokens = (c.image_size // c.patch_size) ** 2
            # recon: the generation view itself (stretched with Pillow), bilinearly resized to 336
            # inside the model without antialias and without CLIP's normalisation (data.py:149,
            # train_recon_w_clip_vit.py:564): one decoded tensor serves both views
            und = dict(und_size=cfg.image_size, und_mean=(0.5,) * 3, und_std=(0.5,) * 3)
            # t2i_clip_recon_prompt (prompting_utils.py:92-139): the text part, specials included,
            # right-padded to 128 ids (a longer one is an assertion there, a refusal here)
            self.template = PromptTemplate(text="<|mmu|><|soi|>{image}<|eoi|><|endoftext|>USER: \n {instruction}"
                                                " ASSISTANT:<|endoftext|>", image_token=MASK, pad_token="[PAD]",
                                           text_tokens=cfg.recon_text_tokens)
            # LLaVA's phi1.5 conversation (llava_instruct_data.py): "USER: \n{q} ASSISTANT: {a}<|endoftext|>"
            self.caption_template = PromptTemplate(text=f"<|mmu|>{SYSTEM}<|soi|>{{image}}<|eoi|>USER: \n"
                                                        "{instruction} ASSISTANT:", image_token=MASK, pad_token="[PAD]",
                                                   answer_prefix=" ", end_of_turn="<|endoftext|>",
                                                   next_turn="USER: {instruction} ASSISTANT:")
            cap_und = dict(und_size=c.image_size, und_mean=CLIP_MEAN, und_std=CLIP_STD)
        else:
            self.num_visual_tokens = (cfg.vq_input_size // self.vq.downsample) ** 2
            und = dict(und_size=cfg.vq_input_size, und_mean=(0.5,) * 3, und_std=(0.5,) * 3)
            # train_recon.py:546-608: f"USER: \n {instruction} ASSISTANT:", one instruction for the batch
            self.template = PromptTemplate(text="<|mmu|><|soi|>{image}<|eoi|><|endoftext|>USER: \n {instruction}"
                                                " ASSISTANT:<|endoftext|>", image_token=MASK, pad_token="[PAD]",
                                           instruction_per="batch")
            self.caption_template = PromptTemplate(text="<|mmu|><|soi|>{image}<|eoi|>USER: \n{instruction} ASSISTANT:",
                                                   image_token=MASK, pad_token="[PAD]", answer_prefix=" ",
                                                   end_of_turn="<|endoftext|>", next_turn="USER: {instruction} ASSISTANT:")
            cap_und = und
        freeze_except(self, tuple(modules), tuple(m for m in cfg.trainable if m in modules))
        # RecA's text-only prompt: the recon template without the image and its <|soi|><|eoi|>
        self.text_prompt = "<|mmu|><|endoftext|>USER: \n {instruction} ASSISTANT:<|endoftext|>"
        self.views = ViewSpec(**und, gen_size=cfg.image_size, gen_resize="stretch")
        self.caption_views = ViewSpec(**cap_und, gen_size=cfg.image_size, gen_resize="crop")
        self.latent_grid = cfg.image_size // self.vq.downsample
        self.num_codes = self.latent_grid**2
        self.image_token_id = self.layout.mask_id
        self.conditioning = Conditioning(self.showo.model.embed_tokens, self.ops, self.image_token_id)
        self._soi, self._eoi, self._pad = (self.tokenizer.token_id(t) for t in ("<|soi|>", "<|eoi|>", "[PAD]"))
        self.recon_embed_grad = cfg.visual == "vq" if cfg.recon_embed_grad is None else cfg.recon_embed_grad

    # --- visual prompt and target ---------------------------------------------------------------
    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hu, Wu] -> [B, Nv, D]. CLIP: patch tokens of the second-to-last layer (the
        built tower's last) through mm_projector. VQ: the embeddings of the image's own codes."""
        if self.cfg.visual == "vq":
            return self.showo.model.embed_tokens(self.vq.encode_codes(und) + self.layout.code_offset)
        side = self.cfg.clip.image_size
        with torch.no_grad():
            if und.shape[-1] != side:  # the recon view: bilinear, no antialias, as upstream
                und = F.interpolate(und, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
            feats = self.clip(pixel_values=und.to(self.clip.dtype)).last_hidden_state[:, 1:]
        return self.mm_projector(feats.to(self.mm_projector[0].weight.dtype))

    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, Hg, Wg] in [-1, 1] -> code ids in the unified vocabulary [B, N]."""
        return self.vq.encode_codes(gen) + self.layout.code_offset

    def mask_codes(self, ids: torch.Tensor, generator: torch.Generator | None = None):
        """MaskGIT masking (Show-o's `mask_or_random_replace_tokens`, cosine schedule): per image
        t ~ U(0, 1), round(N cos(pi t / 2)) >= 1 positions chosen by a random permutation become
        the mask token. -> (input ids [B, N], labels [B, N]: the code where masked, else -100)."""
        b, n = ids.shape
        t = torch.rand(b, device=ids.device, generator=generator)
        ratio = torch.cos(t * math.pi / 2).clamp_min(self.cfg.min_masking_rate)
        count = (n * ratio).round().clamp_min(1)
        rank = torch.rand(b, n, device=ids.device, generator=generator).argsort(-1)
        masked = rank < count[:, None]
        return ids.masked_fill(masked, self.layout.mask_id), ids.masked_fill(~masked, -100), ratio

    # --- the sequence ---------------------------------------------------------------------------
    def layout_prompt(self, prompt: PromptBatch) -> PromptBatch:
        """VQ: the right-padded prompt moved to the right end of its P slots (upstream left-pads)."""
        if self.cfg.visual != "vq":
            return prompt
        p = prompt.mask.shape[1]
        src = (torch.arange(p, device=prompt.mask.device) + prompt.mask.sum(1, keepdim=True)) % p
        return PromptBatch(prompt.input_ids.gather(1, src), prompt.mask.gather(1, src))

    def sequence(self, prompt: PromptBatch, codes: torch.Tensor):
        """Prompt ids [B, P] + code ids [B, N] -> ids [B, L], valid [B, L], block [B, L] (1: the
        given image of the VQ prompt, 2: the target image), L = P + N + 2."""
        b, n = codes.shape
        soi, eoi = codes.new_full((b, 1), self._soi), codes.new_full((b, 1), self._eoi)
        ids = torch.cat([prompt.input_ids, soi, codes, eoi], 1)
        valid = torch.cat([prompt.mask, prompt.mask.new_ones(b, n + 2)], 1)
        block = torch.zeros_like(ids, dtype=torch.int8)
        if self.cfg.visual == "vq":  # <|soi|> given codes <|eoi|>, and <|soi|> target <|eoi|>
            opened = (ids == self._soi).cumsum(1) - (ids == self._eoi).cumsum(1) + (ids == self._eoi).long()
            block = (opened.clamp(0, 1) * (ids == self._soi).cumsum(1)).to(torch.int8)
        else:  # CLIP: the N codes alone
            block[:, -1 - n:-1].fill_(2)  # fill_, not `= 2`: setitem makes a host tensor of the 2
        return ids, valid, block

    def omni_mask(self, valid: torch.Tensor, block: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, L] bool: q sees k when k is valid and (k <= q, or k is `seen` by all
        [B, L], or both lie in one image block); and always itself."""
        n = valid.shape[1]
        ar = torch.arange(n, device=valid.device)
        causal = ar[None, :, None] >= ar[None, None, :]
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
        allowed = (causal | seen[:, None, :] | same) & valid[:, None, :]
        return (allowed | (ar[:, None] == ar[None, :]))[:, None]

    def hidden(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Phi's final-norm hidden states [B, L, D] under a prepared 4-D mask (used as given)."""
        return self.showo.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                use_cache=False).last_hidden_state

    def _visual_columns(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: columns every query sees. CLIP: the visual tokens; VQ: none in recon."""
        if self.cfg.visual == "clip":
            return ids == self.image_token_id
        return torch.zeros_like(ids, dtype=torch.bool)

    def recon_hidden(self, prompt_embeds, prompt: PromptBatch, codes: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, N, D] at the code positions of prompt | <|soi|> codes <|eoi|>."""
        p, n = prompt.mask.shape[1], codes.shape[1]
        ids, valid, block = self.sequence(prompt, codes)
        seen = self._visual_columns(ids) & (torch.arange(ids.shape[1], device=ids.device) < p)
        tail = self.showo.model.embed_tokens(ids[:, p:]).to(prompt_embeds.dtype)
        if not (self.recon_embed_grad and torch.is_grad_enabled()):
            tail = tail.detach()
        embeds = torch.cat([prompt_embeds, tail], 1)
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        return self.hidden(embeds, self.omni_mask(valid, block, seen), positions)[:, p + 1:p + 1 + n]

    # --- objectives -----------------------------------------------------------------------------
    def recon_loss(self, batch: ReconBatch, generator: torch.Generator | None = None) -> LossOutput:
        prompt = self.layout_prompt(batch.prompt)
        target = self.make_target(batch.gen, generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.recon_embed_grad):
            embeds = self.conditioning(prompt.input_ids, self.encode_visual_prompt(batch.und))
        inputs, labels, ratio = self.mask_codes(target, generator)
        h = self.recon_hidden(embeds, prompt, inputs)
        head = self.showo.lm_head
        loss = self.ops.linear_cross_entropy(h.flatten(0, 1), head.weight, labels.flatten(), bias=head.bias,
                                             ignore_index=-100)
        return LossOutput(loss=loss, metrics={"mask_ratio": ratio.detach().float().mean()})

    def caption_loss(self, batch: CaptionBatch, generator: torch.Generator | None = None) -> LossOutput:
        """Next-token cross-entropy on the answer [B, A] after the caption prompt [B, P] (its
        visual tokens in place). Causal, padding hidden, the visual columns seen by all (CLIP:
        `create_attention_mask_for_mmu_vit`; VQ: everything up to the image's <|eoi|>,
        `create_attention_mask_for_mmu`)."""
        prompt = batch.prompt
        b, p = prompt.mask.shape
        a = batch.answer_ids.shape[1]
        embeds = self.conditioning(prompt.input_ids, self.encode_visual_prompt(batch.und))
        answers = self.showo.model.embed_tokens(batch.answer_ids).to(embeds.dtype)
        ids = torch.cat([prompt.input_ids, batch.answer_ids], 1)
        valid = torch.cat([prompt.mask, batch.answer_mask], 1)
        if self.cfg.visual == "clip":
            seen = ids == self.image_token_id
        else:
            eoi = (ids == self._eoi).long()
            seen = (eoi.cumsum(1) - eoi) == 0  # up to and including the image's <|eoi|>
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        mask = self.omni_mask(valid, torch.zeros_like(ids, dtype=torch.int8), seen & valid)
        hidden = self.hidden(torch.cat([embeds, answers], 1), mask, positions)
        j = torch.arange(a, device=ids.device)[None]
        src = torch.where(j == 0, prompt.mask.long().sum(1, keepdim=True) - 1, p + j - 1)  # [B, A]
        h = hidden.gather(1, src[..., None].expand(b, a, hidden.shape[-1]))
        targets = batch.answer_ids.masked_fill(~batch.targets(), -100)  # later questions seen, not scored
        head = self.showo.lm_head
        loss = self.ops.linear_cross_entropy(h.flatten(0, 1), head.weight, targets.flatten(), bias=head.bias,
                                             ignore_index=-100)
        return LossOutput(loss=loss, metrics={"caption_tokens": batch.targets().sum().detach().float()})

    @torch.no_grad()
    def generate(self, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        prompt = self.layout_prompt(batch.prompt)
        if batch.und is None:
            embeds = self.showo.model.embed_tokens(prompt.input_ids)
        else:
            embeds = self.conditioning(prompt.input_ids, self.encode_visual_prompt(batch.und))
        return self.sample(embeds, prompt, batch.steps, generator)

    @torch.no_grad()
    def sample(self, prompt_embeds, prompt: PromptBatch, steps: int, generator=None) -> torch.Tensor:
        """Show-o's `t2i_generate` without guidance: every round draws each code from the
        softmax over the codebook, keeps the already known ones, and re-masks the
        floor(N cos(pi/2 (s + 1) / S)) least confident (log p + Gumbel noise scaled by
        temperature (1 - (s + 1) / S)), at least one and one fewer than still unknown.
        -> images [B, 3, Hg, Wg] in [-1, 1]."""
        b, n, dev = prompt_embeds.shape[0], self.num_codes, prompt_embeds.device
        off, k = self.layout.code_offset, self.layout.codebook
        head = self.showo.lm_head
        ids = torch.full((b, n), self.layout.mask_id, dtype=torch.long, device=dev)
        sampled = ids
        for step in range(max(1, steps)):
            h = self.recon_hidden(prompt_embeds, prompt, ids)
            logits = F.linear(h.float(), head.weight[off:off + k].float(), head.bias[off:off + k].float())
            probs = logits.softmax(-1)
            draw = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(b, n)
            unknown = ids == self.layout.mask_id
            sampled = torch.where(unknown, draw + off, ids)
            ratio = (step + 1) / max(1, steps)
            conf = probs.gather(-1, (sampled - off)[..., None])[..., 0].log()
            u = torch.rand(conf.shape, device=dev, generator=generator).clamp(1e-20, 1 - 1e-7)
            conf = conf + self.cfg.sample_temperature * (1 - ratio) * -torch.log(-torch.log(u))
            conf = torch.where(unknown, conf, torch.finfo(conf.dtype).max)
            keep_masked = math.floor(n * math.cos(math.pi / 2 * ratio))
            count = torch.minimum(unknown.sum(-1, keepdim=True) - 1, torch.full_like(conf[:, :1], keep_masked).long())
            count = count.clamp_min(1)
            cut = conf.sort(-1).values.gather(-1, count)
            ids = torch.where(conf < cut, self.layout.mask_id, sampled)
        return self.vq.decode_codes(sampled - off).float().clamp(-1, 1)

    # --- engine extras --------------------------------------------------------------------------
    def parameter_breakdown(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        phi = self.showo
        out = {"showo.model.embed_tokens": count(phi.model.embed_tokens), "showo.model.layers": count(phi.model.layers),
               "showo.model.final_layernorm": count(phi.model.final_layernorm), "showo.lm_head": count(phi.lm_head),
               "showo (LLM)": count(phi)}
        for name in ("mm_projector", "clip", "vq"):
            if hasattr(self, name):
                out[name] = count(getattr(self, name))
        return out

    def load_pretrained(self, directory: str) -> dict[str, int]:
        """Show-o checkpoint / Phi-1.5 directory / CLIP / MAGVIT-v2 (`reca.models.showo.weights`)."""
        from reca.models.showo.weights import load_pretrained

        return load_pretrained(self, directory)

    def export(self, path: str) -> None:
        """Write `showo.*` and `mm_projector.*` in Show-o's checkpoint layout (`.safetensors`/`.bin`)."""
        from reca.models.showo.weights import export_showo

        export_showo(self, path)
