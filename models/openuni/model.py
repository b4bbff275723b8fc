"""OpenUni family (MetaQuery style): a frozen InternVL3, learnable queries, a connector, a SANA DiT.

Understanding (the visual prompt, FAMILY_FACTS.md C2): the generation view [-1, 1] -> [0, 1] ->
ImageNet normalisation -> bilinear resize to the ViT's side (448) -> InternViT (last layer, CLS
dropped) -> pixel shuffle 0.5 -> InternVL's MLP projector -> N = 256 tokens at LLM width, frozen
and under no_grad. They replace the `<IMG_CONTEXT>` placeholders of the prompt (C3)

    <|im_start|>user\\n<img>{256 visual tokens}</img>\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n<img>

Generation (C4, C7): Q = 256 learnable `meta_queries` appended after the prompt -> the frozen
causal LLM (Qwen2.5) -> their last hidden states -> `connector` (6 bidirectional blocks) ->
`projector` (Linear to SANA's 2304 caption channels) -> SANA's `encoder_hidden_states` (no mask).
SANA predicts the flow velocity eps - x0 on DC-AE latents x_s = (1 - s) x0 + s eps, with s drawn
from SANA's 1000-step training table: s = (1000 - floor(1000 u)) / 1000, u ~ U(0, 1), timestep
1000 s; loss = MSE averaged over every latent element (per-sample mean then batch mean: the same,
as every sample has the same size), which is exactly `ops.flow_matching_noise/_loss`.

Where this departs from OpenUni (said in the report):
* The prompt is right-padded (the engine's fixed P) where OpenUni left-pads; each row is packed
  before the LLM (valid tokens first, then the queries, as Harmon does), so the LLM sees exactly
  OpenUni's left-padded sequence with positions cumsum(mask) - 1 and plain causal attention.
* Both views are one tensor (`ViewSpec.same_pixels`): the visual path resizes the 512 px view to
  448 itself, as OpenUni's `get_semantic_features` does.
* Sampling (previews) integrates the velocity with Euler steps under `sample_shift` (SANA's
  flow_shift 3.0), without classifier-free guidance; OpenUni samples with DPM-Solver and CFG 4.5.
* The MLLM is transformers' `InternVLModel` (`lmm.vision_tower`, `lmm.multi_modal_projector`,
  `lmm.language_model`); OpenUni's remote-code names are mapped on load and export
  (`reca.models.openuni.weights`). The unused LM head is not built.
Shapes: B batch, P prompt, Q queries, D LLM width, T = h w latent tokens, C latent channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from reca.kernels import KernelOps, get_ops
from reca.models.adapter import LossOutput, PromptBatch, PromptTemplate, ViewSpec
from reca.models.base import Conditioning, RecaModule
from reca.models.layers import DropPath, Qwen2Shape, freeze_except, patchify, unpatchify
from reca.models.openuni.connector import ConnectorEncoder, ConnectorShape
from reca.models.tokenizer import load_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODULES = ("meta_queries", "connector", "projector", "transformer")  # what may train; lmm and vae never
TRAIN_TIMESTEPS = 1000  # SANA's FlowMatchEulerDiscreteScheduler table


@dataclass(kw_only=True)
class InternViTShape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 32  # InternVL3: 448
    patch_size: int = 4  # InternVL3: 14
    downsample_ratio: float = 0.5  # pixel shuffle: (448 / 14 * 0.5)^2 = 256 tokens
    # InternViT's stochastic depth, spaced 0 .. rate over the layers as InternViT's encoder does:
    # OpenUni's trainer leaves the frozen InternVL3 in train mode, so it applies and the visual
    # prompt is stochastic. -1 = the rate of the release's own config (DIR/internvl/config.json,
    # vision_config.drop_path_rate) when --init-from has one, else none; 0 = none.
    drop_path_rate: float = 0.0


@dataclass(kw_only=True)
class SanaShape:
    """diffusers `SanaTransformer2DModel` (FAMILY_FACTS.md C5); cross-attention width = self-attention width."""

    heads: int = 2
    head_dim: int = 16
    layers: int = 2
    cross_heads: int = 2
    cross_head_dim: int = 16
    caption_channels: int = 32  # SANA: 2304 (Gemma-2 width)
    mlp_ratio: float = 2.5
    qk_norm: str = ""  # "" = none; SANA1.5: "rms_norm_across_heads"


@dataclass(kw_only=True)
class DCAEShape:
    """diffusers `AutoencoderDC`; defaults are `dc-ae-f32c32-sana-1.x` (FAMILY_FACTS.md C6): ResBlock
    stages, then EfficientViT stages (multi-scale 5), /2 per stage after the first."""

    latent_channels: int = 32
    channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    vit_stages: int = 3  # the last stages are EfficientViT blocks
    attention_head_dim: int = 32
    scaling_factor: float = 0.41407

    def build(self):
        from diffusers import AutoencoderDC

        n = len(self.channels)
        kinds = ("ResBlock",) * (n - self.vit_stages) + ("EfficientViTBlock",) * self.vit_stages
        scales = ((),) * (n - self.vit_stages) + ((5,),) * self.vit_stages
        return AutoencoderDC(
            in_channels=3, latent_channels=self.latent_channels, attention_head_dim=self.attention_head_dim,
            encoder_block_types=kinds, decoder_block_types=kinds,
            encoder_block_out_channels=self.channels, decoder_block_out_channels=self.channels,
            encoder_layers_per_block=self.encoder_layers, decoder_layers_per_block=self.decoder_layers,
            encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
            downsample_block_type="Conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=self.scaling_factor)


@dataclass(kw_only=True)
class OpenUniConfig:
    family: str = "openuni"
    llm: Qwen2Shape = field(default_factory=Qwen2Shape)
    vit: InternViTShape = field(default_factory=InternViTShape)
    connector: ConnectorShape = field(default_factory=ConnectorShape)
    sana: SanaShape = field(default_factory=SanaShape)
    vae: DCAEShape = field(default_factory=DCAEShape)
    image_size: int = 32  # both views (OpenUni: 512, square-cropped)
    num_queries: int = 16  # OpenUni: 256
    train_shift: float = 1.0  # SANA's training table read as FlowMatchEulerDiscreteScheduler: shift 1 (C7)
    sample_shift: float = 1.0  # previews; SANA's flow_shift is 3.0
    # the visual placeholder; "" = InternVL3's "<IMG_CONTEXT>" when the tokenizer has it, else
    # "<|image_pad|>" (reca's tiny tokenizer: `reca info` on a real preset needs no tokenizer files)
    image_token: str = ""
    trainable: tuple[str, ...] = MODULES  # RecA reca_2_1.6_3o: without "transformer"
    tokenizer: str = ""  # a local InternVL3 tokenizer directory; empty = reca's tiny byte-level BPE


def _drop_attention(drop: nn.Module):
    def hook(module, args, out):
        return (drop(out[0]), *out[1:]) if isinstance(out, tuple) else drop(out)
    return hook


def _diffusers():
    try:
        import diffusers
    except ImportError as e:  # the GPU image has none; only this family needs it
        raise ImportError("the openuni family needs diffusers: pip install 'reca[openuni]'") from e
    return diffusers


def _has_token(tokenizer, token: str) -> bool:
    try:
        tokenizer.token_id(token)
    except KeyError:
        return False
    return True


class OpenUniModel(RecaModule):
    """RecA adapter for OpenUni. Parameter names are OpenUni's (`meta_queries`, `connector.`,
    `projector.`, `transformer.`, `vae.`), the MLLM's are transformers' under `lmm.`."""

    objectives = frozenset({"recon", "sample"})
    capabilities = frozenset({"init_from", "export"})

    def __init__(self, cfg: OpenUniConfig, ops: KernelOps | None = None):
        super().__init__()
        diffusers = _diffusers()
        from transformers import InternVLConfig, InternVLModel, InternVLVisionConfig

        self.cfg = cfg
        self.ops = ops or get_ops("torch")
        q, v, s = cfg.llm, cfg.vit, cfg.sana
        if cfg.connector.width != q.hidden_size:
            raise ValueError(f"connector width {cfg.connector.width} must equal the LLM width {q.hidden_size} "
                             "(OpenUni's enc_proj: the projector follows the connector)")
        vision = InternVLVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
            attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
            use_absolute_position_embeddings=True, use_mean_pooling=True, attn_implementation="sdpa")
        self.lmm = InternVLModel(InternVLConfig(
            vision_config=vision, text_config=q.hf_config(), downsample_ratio=v.downsample_ratio,
            projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default"))
        self.meta_queries = nn.Parameter(torch.empty(cfg.num_queries, q.hidden_size))
        nn.init.normal_(self.meta_queries, std=q.hidden_size**-0.5)
        self.connector = ConnectorEncoder(cfg.connector)
        self.projector = nn.Linear(cfg.connector.width, s.caption_channels)
        self.vae = cfg.vae.build()
        self.downsample = 2 ** (len(cfg.vae.channels) - 1)
        if cfg.image_size % self.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of the DC-AE factor {self.downsample}")
        self.latent_channels = cfg.vae.latent_channels
        self.latent_grid = cfg.image_size // self.downsample
        self.transformer = diffusers.SanaTransformer2DModel(
            in_channels=self.latent_channels, out_channels=self.latent_channels, num_attention_heads=s.heads,
            attention_head_dim=s.head_dim, num_layers=s.layers, num_cross_attention_heads=s.cross_heads,
            cross_attention_head_dim=s.cross_head_dim, cross_attention_dim=s.heads * s.head_dim,
            caption_channels=s.caption_channels, mlp_ratio=s.mlp_ratio, attention_bias=False,
            sample_size=self.latent_grid, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=None, qk_norm=s.qk_norm or None)
        if v.drop_path_rate:  # -1: built at 0, set from the release's config when it is loaded
            self.set_vit_drop_path(max(v.drop_path_rate, 0.0), install=True)
        self.lmm.requires_grad_(False)
        self.vae.requires_grad_(False)
        freeze_except(self, MODULES, cfg.trainable)
        self.register_buffer("vit_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("vit_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.tokenizer = load_tokenizer(cfg.tokenizer or None, q.vocab_size)
        if self.tokenizer.vocab_size > q.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the LLM only {q.vocab_size}")
        image_token = cfg.image_token or next(
            (t for t in ("<IMG_CONTEXT>", "<|image_pad|>") if _has_token(self.tokenizer, t)), "<IMG_CONTEXT>")
        self.template = PromptTemplate(
            text="<|im_start|>user\n<img>{image}</img>\n{instruction}<|im_end|>\n<|im_start|>assistant\n<img>",
            image_token=image_token)
        self.text_prompt = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n<img>"  # no input image
        self.views = ViewSpec(und_size=cfg.image_size, und_mean=(0.5, 0.5, 0.5), und_std=(0.5, 0.5, 0.5),
                              gen_size=cfg.image_size, gen_resize="crop")
        self.num_visual_tokens = int(v.image_size // v.patch_size * v.downsample_ratio) ** 2
        self.image_token_id = self.tokenizer.token_id(image_token)
        self.conditioning = Conditioning(self.lmm.language_model.embed_tokens, self.ops, self.image_token_id)

    # --- recon -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_vit_drop_path(self, rate: float, install: bool = False) -> None:
        """InternViT's drop path on both residual branches of every layer, rates spaced 0 .. `rate`
        (InternVL's `InternVisionEncoder`). transformers' `InternVLVisionLayer` has none: the
        attention branch gets it by a hook on the attention's output (its layer scale commutes
        with a per-sample factor), the MLP branch in place of the layer's zero-rate dropout."""
        layers = self.lmm.vision_tower.encoder.layer
        if not (rate or install or hasattr(layers[0], "drop_path1")):
            return  # none asked for: transformers' layers as they are, no hooks
        n = len(layers)
        rates = [rate * i / (n - 1) for i in range(n)] if n > 1 else [rate]  # torch.linspace(0, rate, n)
        for layer, r in zip(layers, rates):
            if not hasattr(layer, "drop_path1"):
                if layer.dropout.p:
                    raise ValueError("InternViT drop path replaces a zero-rate MLP dropout; this one has "
                                     f"p={layer.dropout.p}")
                layer.drop_path1 = DropPath()
                layer.dropout = DropPath()
                layer.attention.register_forward_hook(_drop_attention(layer.drop_path1))
            layer.drop_path1.p = layer.dropout.p = r

    def encode_visual_prompt(self, und: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, N, D] (OpenUni's `get_semantic_features` + InternVL's
        `extract_feature`); frozen, so no graph is kept."""
        side = self.cfg.vit.image_size
        x = ((und.float() + 1) / 2 - self.vit_mean) / self.vit_std
        x = F.interpolate(x, size=(side, side), mode="bilinear")
        tower = self.lmm.vision_tower
        feats = tower(pixel_values=x.to(tower.embeddings.cls_token.dtype)).last_hidden_state[:, 1:]  # CLS dropped
        b, n, c = feats.shape
        g = int(round(n**0.5))
        feats = self.lmm.pixel_shuffle(feats.reshape(b, g, g, c), scale_factor=self.cfg.vit.downsample_ratio)
        return self.lmm.multi_modal_projector(feats.reshape(b, -1, feats.shape[-1]))

    @torch.no_grad()
    def make_target(self, gen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled DC-AE latent tokens x0 [B, T, C] (float32, raster order)."""
        z = self.vae.encode(gen.to(self.vae.dtype))[0] * self.cfg.vae.scaling_factor
        return patchify(z, 1).float()

    def generation_loss(self, prompt_embeds, prompt: PromptBatch, target, generator=None) -> LossOutput:
        x0 = target
        u = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        sigma = self.shift(1 - torch.floor(u * TRAIN_TIMESTEPS) / TRAIN_TIMESTEPS, self.cfg.train_shift)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        x_t = self.ops.flow_matching_noise(x0, noise, sigma)
        pred = self.velocity(x_t, self.condition(prompt_embeds, prompt), sigma)
        loss = self.ops.flow_matching_loss(pred, x0, noise)
        return LossOutput(loss=loss, metrics={"sigma_mean": sigma.mean().detach()})

    # --- sample ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt_embeds, prompt: PromptBatch, steps: int, generator=None) -> torch.Tensor:
        """Euler integration of the velocity from noise (s = 1) to data (s = 0), the condition
        computed once -> [B, 3, H, W] in [-1, 1]."""
        cond = self.condition(prompt_embeds, prompt)
        b, dev = prompt_embeds.shape[0], prompt_embeds.device
        x = torch.randn(b, self.latent_grid**2, self.latent_channels, device=dev, generator=generator)
        sig = self.shift(torch.linspace(1.0, 0.0, max(1, steps) + 1, device=dev), self.cfg.sample_shift)
        for i in range(len(sig) - 1):
            x = x + (sig[i + 1] - sig[i]) * self.velocity(x, cond, sig[i].expand(b)).float()
        return self.decode_target(x)

    def decode_target(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent tokens [B, T, C] -> images [B, 3, H, W] in [-1, 1]."""
        z = unpatchify(x0.float(), 1, self.latent_channels, self.latent_grid) / self.cfg.vae.scaling_factor
        return self.vae.decode(z.to(self.vae.dtype))[0].float().clamp(-1, 1)

    # --- OpenUni internals -----------------------------------------------------------------
    @staticmethod
    def shift(s: torch.Tensor, k: float) -> torch.Tensor:
        """SANA's time shift k s / (1 + (k - 1) s)."""
        return s if k == 1.0 else k * s / (1 + (k - 1) * s)

    def condition(self, prompt_embeds: torch.Tensor, prompt: PromptBatch) -> torch.Tensor:
        """Prompt [B, P, D] -> SANA condition [B, Q, caption_channels]: the queries after the
        prompt through the LLM, their last hidden states through connector and projector."""
        b, p, _ = prompt_embeds.shape
        queries = self.meta_queries[None].expand(b, -1, -1).to(prompt_embeds.dtype)
        valid = torch.cat([prompt.mask, prompt.mask.new_ones(b, queries.shape[1])], dim=1)
        hidden = self.llm_hidden(torch.cat([prompt_embeds, queries], dim=1), valid)[:, p:]
        return self.projector(self.connector(hidden))

    def llm_hidden(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Final-norm LLM states [B, L, D] over embeds [B, L, D] where only `valid` [B, L]
        positions are keys; positions count valid tokens only (OpenUni's cumsum(mask) - 1).
        Each row is packed (valid tokens first, in order) so the attention is plain causal with
        no mask, then unpacked; outputs at non-valid positions are meaningless."""
        b, n, d = embeds.shape
        ar = torch.arange(n, device=valid.device)
        order = (ar + (~valid).long() * n).argsort(dim=1)
        packed = embeds.gather(1, order[..., None].expand(b, n, d))
        llm = self.lmm.language_model
        # {layer type: None} skips transformers' mask building (its packed-sequence check syncs)
        out = llm(inputs_embeds=packed, attention_mask=dict.fromkeys(llm.config.layer_types),
                  use_cache=False).last_hidden_state
        return out.gather(1, order.argsort(dim=1)[..., None].expand(b, n, out.shape[-1]))

    def velocity(self, x_t: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Noised tokens [B, T, C] at noise level sigma [B] under cond [B, Q, Cc] -> [B, T, C]."""
        dtype = self.transformer.proj_out.weight.dtype
        z = unpatchify(x_t.to(dtype), 1, self.latent_channels, self.latent_grid)
        out = self.transformer(hidden_states=z, encoder_hidden_states=cond.to(dtype),
                               timestep=sigma * TRAIN_TIMESTEPS, return_dict=False)[0]
        return patchify(out, 1)

    # --- optional members --------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The repeated blocks the engine compiles and checkpoints (`reca.engine.compile`): ViT,
        LLM, connector and SANA layers. The DC-AE's stages are left out: they run once per
        sample, frozen, under no_grad, and are not a stack of equal blocks."""
        return [*self.lmm.vision_tower.encoder.layer, *self.lmm.language_model.layers, *self.connector.layers,
                *self.transformer.transformer_blocks]

    def parameter_breakdown(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"lmm.vision_tower (InternViT)": count(self.lmm.vision_tower),
                "lmm.multi_modal_projector (mlp1)": count(self.lmm.multi_modal_projector),
                "lmm.language_model (Qwen2.5)": count(self.lmm.language_model),
                "meta_queries": self.meta_queries.numel(), "connector": count(self.connector),
                "projector": count(self.projector), "transformer (SANA)": count(self.transformer),
                "vae (DC-AE)": count(self.vae)}

    def load_pretrained(self, directory: str) -> dict[str, int]:
        """OpenUni checkpoint / InternVL3 / SANA / DC-AE from `directory` (`reca.models.openuni.weights`)."""
        from reca.models.openuni.weights import load_pretrained

        return load_pretrained(self, directory)

    def export(self, path: str) -> None:
        """The trained parts in OpenUni's checkpoint layout (`.pth` or `.safetensors`)."""
        from reca.models.openuni.weights import export_openuni

        export_openuni(self, path)
