"""Named presets: plain functions returning a complete `RunConfig`; the CLI only overrides fields."""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Callable

from reca.engine.config import DataConfig, MixConfig, OptimConfig, OutputConfig, RunConfig, SampleConfig, TrainConfig
from reca.engine.errors import UserError
from reca.models.layers import Qwen2Shape

# Each preset imports its family where it is called: reading this module imports no family
# (a family imports transformers and its model code, seconds on a cold start).


def tiny() -> RunConfig:
    """The embedded default: a ~3M-parameter flow-matching model, 32 px images, a pixel-patch
    "VAE" (reconstructions are viewable), trained on photographs bundled with scikit-image.
    Several steps per second on two CPU cores."""
    from reca.models.flow import FlowConfig, SiglipShape
    from reca.models.vae import VAEConfig

    return RunConfig(
        preset="tiny",
        model=FlowConfig(
            llm=Qwen2Shape(vocab_size=1024, hidden_size=192, intermediate_size=512, num_layers=4,
                           num_heads=4, num_kv_heads=2, max_position=1024),
            vit=SiglipShape(hidden_size=192, intermediate_size=768, num_layers=4, num_heads=4,
                            image_size=32, patch_size=8),
            vae=VAEConfig(kind="patch", patch=2),
            gen_size=32,
            latent_patch=2,
            trainable=("vit", "connector", "llm", "gen_in", "time_embed", "gen_out"),
        ),
        data=DataConfig(source="demo", batch_size=8),
        sample=SampleConfig(max_text_tokens=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=1200, precision="fp32"),
        output=OutputConfig(dir="runs/tiny", log_every=10, ckpt_every=200, preview_every=400, preview_steps=16),
    )


def demo() -> RunConfig:
    """`make demo`: `tiny` trained to regenerate the 14 bundled photographs whole (no crops, no
    flips), so the previews, which are those photographs, show what the model learned: the image
    generated from a photo's own visual prompt against the one generated, with the same noise,
    from another photo's. Sampled with BAGEL's inference time shift (3.0). A step costs what a
    `tiny` step does: 3 min 40 s with its previews on two CPU cores. Measured (alignment line at the end):
    24.8 dB from the photo's own visual prompt against 8.4 dB from another's; with crops and
    flips (`tiny`) 14.1 against 8.3 dB by step 800 of 1200."""
    cfg = tiny()
    return dataclasses.replace(
        cfg,
        preset="demo",
        model=dataclasses.replace(cfg.model, sample_shift=3.0),
        data=dataclasses.replace(cfg.data, crop_scale=1.0, hflip=False),
        train=dataclasses.replace(cfg.train, steps=1200),
        output=dataclasses.replace(cfg.output, dir="runs/demo", preview_every=400, preview_steps=16),
    )


def flow_7b() -> RunConfig:
    """Real-size flow-matching preset in BAGEL's shapes: Qwen2-7B-shaped LLM, SigLIP-so400m/14
    at 224 px (256 visual tokens), FLUX-shaped VAE (16 latent channels, /8) at 512 px, 2 x 2
    latent patches (1024 generation tokens). BAGEL's optimiser: lr 4e-5, eps 1e-15, no weight
    decay, constant after 1000 warm-up steps. Understanding encoder, connector and VAE frozen."""
    from reca.models.flow import FlowConfig, SiglipShape
    from reca.models.vae import VAEConfig, flux_vae_config

    return RunConfig(
        preset="flow-7b",
        model=FlowConfig(
            llm=Qwen2Shape(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                           num_heads=28, num_kv_heads=4, rope_theta=1_000_000.0, max_position=32768),
            vit=SiglipShape(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                            image_size=224, patch_size=14),
            vae=VAEConfig(kind="kl", kl=flux_vae_config()),
            gen_size=512,
            latent_patch=2,
            sample_shift=3.0,
            trainable=("llm", "gen_in", "time_embed", "gen_out"),
        ),
        data=DataConfig(batch_size=24, num_workers=8),
        optim=OptimConfig(lr=4e-5, eps=1e-15, weight_decay=0.0, warmup_steps=1000, schedule="constant"),
        train=TrainConfig(steps=10_000, checkpoint_every=1),
        output=OutputConfig(dir="runs/flow-7b", log_every=10, ckpt_every=1000, preview_every=1000, preview_steps=30),
    )


def harmon_tiny() -> RunConfig:
    """Harmon (AR + MAR) at CPU scale: a 2-layer Qwen2, a 2 + 2-block MAR of width 64 with 8
    buffers, a 2-block head, 32 px images through the pixel-patch "VAE" (4 x 4 patches: an 8 x 8
    grid of 48-channel tokens, 72 visual-prompt tokens). Several steps per second on two cores."""
    from reca.models.harmon import HarmonConfig
    from reca.models.harmon.diffhead import DiffHeadShape
    from reca.models.harmon.mar import MARShape
    from reca.models.vae import VAEConfig

    return RunConfig(
        preset="harmon-tiny",
        model=HarmonConfig(
            llm=Qwen2Shape(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position=1024),
            mar=MARShape(width=64, encoder_depth=2, decoder_depth=2, num_heads=4, buffer_size=8, pos_grid=8,
                         dropout=0.0, num_classes=10),
            head=DiffHeadShape(width=128, depth=2, batch_mul=4, sample_steps=20),
            vae=VAEConfig(kind="patch", patch=4),
            image_size=32,
            sample_clip=1.0,  # pixel tokens lie in [-1, 1]; keeps previews of a young head from diverging
        ),
        data=DataConfig(source="demo", batch_size=8, crop_scale=1.0, hflip=False),  # Harmon: whole image, unflipped
        sample=SampleConfig(max_text_tokens=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=1200, precision="fp32"),
        output=OutputConfig(dir="runs/harmon-tiny", log_every=10, ckpt_every=200, preview_every=400, preview_steps=4),
    )


def _harmon(name: str, llm: Qwen2Shape, mar: MARShape, head: DiffHeadShape, batch: int) -> RunConfig:
    """Harmon's RecA recipe (RECA_SPEC.md): 512 px stretched, KL-16 latents (1024 tokens, 1088
    visual-prompt tokens), AdamW lr 1e-5, betas (0.9, 0.95), weight decay 0.02, clip 1.0, 1 %
    warm-up then cosine to 0, accumulation 4, 12,500 updates, gradient checkpointing; bf16 on
    CUDA (precision auto). Everything but the VAE trains."""
    from reca.models.harmon import HarmonConfig
    from reca.models.vae import VAEConfig, kl16_config

    steps = 12_500
    return RunConfig(
        preset=name,
        model=HarmonConfig(llm=llm, mar=mar, head=head, vae=VAEConfig(kind="kl", kl=kl16_config()),
                           image_size=512),
        # the official run stretches the whole image to 512 and never flips it
        data=DataConfig(batch_size=batch, num_workers=8, crop_scale=1.0, hflip=False),
        sample=SampleConfig(max_text_tokens=128),
        # 2 reconstruction : 2 image-to-text micro-batches; the captioned images must be given:
        # --set mix.caption_source=DIR (or --set mix.cycle=recon for RecA alone)
        mix=MixConfig(cycle=("recon", "recon", "caption", "caption"), max_answer_tokens=128),
        optim=OptimConfig(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.02, warmup_steps=steps // 100,
                          schedule="cosine", min_lr_ratio=0.0, clip_grad=1.0, grad_accum=4),
        train=TrainConfig(steps=steps, checkpoint_every=1),  # the LLM, MAR and head blocks recomputed
        output=OutputConfig(dir=f"runs/{name}", log_every=10, ckpt_every=500, preview_every=1000, preview_steps=8),
    )


def harmon_0_5b() -> RunConfig:
    """Harmon-0.5B: Qwen2.5-0.5B (896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864), MAR-base
    (768 wide, 12 + 12 blocks, 12 heads), head 6 x 1024; batch 96. The published run's
    instructions: `--prompts Harmon/src/datasets/text2image/consts.py` from the RecA authors'
    repository (HorizonWind2004/reconstruction-alignment)."""
    from reca.models.harmon.diffhead import DiffHeadShape
    from reca.models.harmon.mar import MARShape

    return _harmon(
        "harmon-0.5b",
        Qwen2Shape(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                   num_kv_heads=2, rope_theta=1_000_000.0, max_position=32768),
        MARShape(width=768, encoder_depth=12, decoder_depth=12, num_heads=12, buffer_size=64, pos_grid=16, dropout=0.1),
        DiffHeadShape(width=1024, depth=6, batch_mul=4, sample_steps=25),
        batch=96,
    )


def harmon_1_5b() -> RunConfig:
    """Harmon-1.5B: Qwen2.5-1.5B (1536 wide, 28 layers, 12 heads, 2 KV heads, MLP 8960), MAR-huge
    (1280 wide, 20 + 20 blocks, 16 heads), head 12 x 1536; batch 48. The published run's
    instructions: `--prompts Harmon/src/datasets/text2image/consts.py` from the RecA authors'
    repository (HorizonWind2004/reconstruction-alignment)."""
    from reca.models.harmon.diffhead import DiffHeadShape
    from reca.models.harmon.mar import MARShape

    return _harmon(
        "harmon-1.5b",
        Qwen2Shape(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                   num_kv_heads=2, rope_theta=1_000_000.0, max_position=32768),
        MARShape(width=1280, encoder_depth=20, decoder_depth=20, num_heads=16, buffer_size=64, pos_grid=16,
                 dropout=0.1),
        DiffHeadShape(width=1536, depth=12, batch_mul=4, sample_steps=25),
        batch=48,
    )


def openuni_tiny() -> RunConfig:
    """OpenUni at CPU scale: a 2-layer Qwen2 (64 wide) behind a 2-layer InternViT (32 px, 4 px
    patches, pixel shuffle: 16 visual tokens), 16 queries, a 2-block connector, a 2-block SANA on
    a 3-stage DC-AE (8 x 8 x 4 latents), all random (nothing downloaded). MLLM and DC-AE frozen,
    as in the recipe; no instruction dropout. The DC-AE is untrained: previews are not images."""
    from reca.models.openuni import ConnectorShape, DCAEShape, InternViTShape, OpenUniConfig, SanaShape

    return RunConfig(
        preset="openuni-tiny",
        model=OpenUniConfig(
            llm=Qwen2Shape(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position=1024),
            vit=InternViTShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               image_size=32, patch_size=4),
            connector=ConnectorShape(width=64, mlp=128, heads=4, layers=2),
            sana=SanaShape(heads=2, head_dim=16, layers=2, cross_heads=2, cross_head_dim=16, caption_channels=32),
            vae=DCAEShape(latent_channels=4, channels=(8, 16, 32), encoder_layers=(1, 1, 1),
                          decoder_layers=(1, 1, 1), vit_stages=1, attention_head_dim=8, scaling_factor=1.0),
            image_size=32,
            num_queries=16,
        ),
        data=DataConfig(source="demo", batch_size=8, crop_scale=1.0, hflip=False),
        sample=SampleConfig(max_text_tokens=32, fixed_prob=0.0),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=1200, precision="fp32"),
        output=OutputConfig(dir="runs/openuni-tiny", log_every=10, ckpt_every=200, preview_every=400,
                            preview_steps=8),
    )


def _openuni(name: str, llm: Qwen2Shape, connector: ConnectorShape, sana: SanaShape, accum: int,
             micro_iters: int) -> RunConfig:
    """OpenUni's RecA recipe (FAMILY_FACTS.md C8): 512 px squares at a random offset along the long
    side (crop2square), the same tensor both views, InternViT's drop path as the release sets it,
    no instruction dropout; InternVL3 (InternViT-300M at 448 px, 256 visual tokens) and the DC-AE
    frozen; queries, connector, projector and SANA train. AdamW lr 1e-5, betas (0.9, 0.95), weight
    decay 0.05 (>= 2-D tensors, the queries included), clip 1.0, 1 % warm-up then cosine to 0,
    batch 42; mmengine's `max_iters` counts micro-batches, so updates = micro_iters / accum."""
    from reca.models.openuni import DCAEShape, InternViTShape, OpenUniConfig

    steps = micro_iters // accum
    return RunConfig(
        preset=name,
        model=OpenUniConfig(
            llm=llm,
            vit=InternViTShape(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                               image_size=448, patch_size=14, drop_path_rate=-1.0),  # the release's, as OpenUni trains
            connector=connector,
            sana=sana,
            vae=DCAEShape(),
            image_size=512,
            num_queries=256,
            sample_shift=3.0,  # SANA's flow_shift
        ),
        data=DataConfig(batch_size=42, num_workers=8, crop_scale=1.0, hflip=False, square_offset="random"),  # crop2square
        sample=SampleConfig(max_text_tokens=64, fixed_prob=0.0),
        optim=OptimConfig(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=max(1, steps // 100),
                          schedule="cosine", min_lr_ratio=0.0, clip_grad=1.0, grad_accum=accum),
        train=TrainConfig(steps=steps),
        output=OutputConfig(dir=f"runs/{name}", log_every=10, ckpt_every=250, preview_every=250, preview_steps=20),
    )


def openuni_b_512() -> RunConfig:
    """OpenUni-B-512 (RecA's "OpenUni-1-0.6B", reca_1_0.6): InternVL3-1B (Qwen2.5-0.5B: 896 wide,
    24 layers, 14 heads, 2 KV heads, MLP 4864), connector 896 / 3072 / 14 heads / 6 layers,
    SANA 0.6B (28 layers, 36 x 32 self-attention, 16 x 72 cross-attention); accumulation 4,
    10,000 micro-batches = 2,500 updates. The published run's instructions: `--prompts
    OpenUni/src/datasets/image2image/consts.py` from the RecA authors' repository."""
    from reca.models.openuni import ConnectorShape, SanaShape

    return _openuni(
        "openuni-b-512",
        Qwen2Shape(vocab_size=151_674, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                   num_kv_heads=2, rope_theta=1_000_000.0, max_position=32768),
        ConnectorShape(width=896, mlp=3072, heads=14, layers=6),
        SanaShape(heads=36, head_dim=32, layers=28, cross_heads=16, cross_head_dim=72, caption_channels=2304),
        accum=4, micro_iters=10_000,
    )


def openuni_l_512() -> RunConfig:
    """OpenUni-L-512 (RecA's "OpenUni-2-1.6B", reca_2_1.6): InternVL3-2B (Qwen2.5-1.5B: 1536 wide,
    28 layers, 12 heads, 2 KV heads, MLP 8960), connector 1536 / 8960 / 24 heads / 6 layers,
    SANA 1.6B (20 layers, 70 x 32 self-attention, 20 x 112 cross-attention); accumulation 16,
    5,000 micro-batches = 312 updates. The published run's instructions: `--prompts
    OpenUni/src/datasets/image2image/consts.py` from the RecA authors' repository."""
    from reca.models.openuni import ConnectorShape, SanaShape

    return _openuni(
        "openuni-l-512",
        Qwen2Shape(vocab_size=151_674, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                   num_kv_heads=2, rope_theta=1_000_000.0, max_position=32768),
        ConnectorShape(width=1536, mlp=8960, heads=24, layers=6),
        SanaShape(heads=70, head_dim=32, layers=20, cross_heads=20, cross_head_dim=112, caption_channels=2304),
        accum=16, micro_iters=5_000,
    )


def bagel_tiny() -> RunConfig:
    """BAGEL (Mixture-of-Transformers) at CPU scale, every part real and small: a 2-layer MoT
    (128 wide, both experts), a 2-layer SigLIP NaViT (32 px, 16 visual tokens), 8 samples packed
    into one 1024-token sequence with the split-mode mask, text dropped with p 0.1. The VAE is the
    pixel-patch stand-in of `tiny` (a random frozen KL would make previews unreadable). BAGEL's
    RecA split: ViT, connector and understanding expert frozen; the generation side learns."""
    from reca.models.bagel import BagelConfig, VitShape
    from reca.models.vae import VAEConfig

    return RunConfig(
        preset="bagel-tiny",
        model=BagelConfig(
            llm=Qwen2Shape(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position=1024),
            vit=VitShape(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2, image_size=32,
                         patch_size=8, max_side=4),
            vae=VAEConfig(kind="patch", patch=2),
            gen_size=32, latent_patch=2, max_latent_size=8,
        ),
        data=DataConfig(source="demo", batch_size=8),
        sample=SampleConfig(max_text_tokens=32, fixed_prob=0.0),  # BAGEL drops the text split instead
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=600, precision="fp32", ema=0.999),  # 0.9999's ~10k-step horizon is past the run
        output=OutputConfig(dir="runs/bagel-tiny", log_every=10, ckpt_every=200, preview_every=300, preview_steps=16),
    )


def bagel_7b_mot() -> RunConfig:
    """BAGEL-7B-MoT's RecA run (FAMILY_FACTS.md A9): Qwen2-7B-shaped MoT (3584 wide, 28 layers,
    28 heads, 4 KV heads, MLP 18944, two experts), SigLIP so400m/14 NaViT at 224 px (26 of 27
    layers, 256 tokens, 70-patch tables), FLUX VAE at 1024 px (4096 latent tokens in 2 x 2
    patches, 64-token tables), 8 samples a pack (~36k tokens, BAGEL's max_num_tokens 36864).
    AdamW lr 4e-5, betas (0.9, 0.95), eps 1e-15, no weight decay, 1000 warm-up steps then
    constant, clip 1.0; text dropped with p 0.1 (no fixed instruction); activation checkpointing
    on every block; EMA 0.9999 of the trained weights, updated every step. The public script
    sets no step count (A9): 5,000 is our choice. The published run's instructions: `--prompts
    BAGEL/data/consts.py` from the RecA authors' repository (HorizonWind2004/reconstruction-alignment)."""
    from reca.models.bagel import BagelConfig, VitShape
    from reca.models.vae import VAEConfig, flux_vae_config

    return RunConfig(
        preset="bagel-7b-mot",
        model=BagelConfig(
            llm=Qwen2Shape(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                           num_heads=28, num_kv_heads=4, rope_theta=1_000_000.0, max_position=32768),
            vit=VitShape(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=224,
                         patch_size=14, max_side=70),
            vae=VAEConfig(kind="kl", kl=flux_vae_config()),
            gen_size=1024, latent_patch=2, max_latent_size=64,
        ),
        data=DataConfig(batch_size=8, num_workers=8, crop_scale=1.0, hflip=False),  # BAGEL's transforms: no crop, no flip
        sample=SampleConfig(max_text_tokens=128, fixed_prob=0.0),
        optim=OptimConfig(lr=4e-5, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0, warmup_steps=1000,
                          warmup_from_zero=True, schedule="constant", clip_grad=1.0),  # get_constant_schedule_with_warmup
        train=TrainConfig(steps=5_000, checkpoint_every=1, ema=0.9999),  # FAMILY_FACTS A9: EMA 0.9999 every step
        output=OutputConfig(dir="runs/bagel-7b-mot", log_every=10, ckpt_every=250, preview_every=1000,
                            preview_steps=30),
    )


def showo_tiny() -> RunConfig:
    """Show-o (CLIP variant) at CPU scale: a 2-layer Phi (128 wide) over reca's tiny tokenizer,
    the 10 Show-o specials, 256 image codes and the mask token; a 1-layer CLIP tower (32 px, 8 px
    patches: 16 visual tokens) and the pixel-patch codebook fitted on the demo photographs (4 x 4
    patches: 64 codes, previews viewable). Show-o's recipe otherwise: stretched, unflipped, no
    instruction dropout; CLIP tower and codebook frozen. About a second a step on two cores."""
    from reca.models.showo import ClipShape, PhiShape, ShowoConfig
    from reca.models.showo import CodecConfig as ShowoCodecConfig

    return RunConfig(
        preset="showo-tiny",
        model=ShowoConfig(
            llm=PhiShape(hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, max_position=1024),
            clip=ClipShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=32,
                           patch_size=8),
            codec=ShowoCodecConfig(kind="patch", patch=4),
            image_size=32,
        ),
        data=DataConfig(source="demo", batch_size=8, crop_scale=1.0, hflip=False),
        sample=SampleConfig(max_text_tokens=32, fixed_prob=0.0),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=1200, precision="fp32"),
        output=OutputConfig(dir="runs/showo-tiny", log_every=10, ckpt_every=200, preview_every=400, preview_steps=8),
    )


def _showo(name: str, size: int, batch: int, schedule: str) -> RunConfig:
    """Show-o-RecA (CLIP), RecA's showo_reca_clip.yaml / showo_reca_256_clip.yaml: Phi-1.5 over
    the 58,498-token vocabulary, CLIP-ViT-L/14-336 (576 tokens) through mm_projector, MAGVIT-v2
    codes of the stretched image; AdamW lr 5e-7, betas (0.9, 0.999), weight decay 0.01, 1000
    warm-up steps from 0 (transformers' schedule), then cosine (256) or constant (512: its config
    decays over max_train_steps 1,000,000, flat over these), no clipping, bf16 on CUDA; recon and image-to-text in every step
    (each at weight 1.0: cycle recon, caption with accumulation 10 = upstream's 5 micro-steps
    of recon + mmu; the engine averages over the 10, so the step's gradient is half upstream's
    sum, which AdamW does not see). Phi and mm_projector train; CLIP and MAGVIT-v2 frozen. The
    real tokenizer is Phi-1.5's: --set model.tokenizer=DIR; captioned images: mix.caption_source.
    Steps: 10,000 (the 256 config; the 512 config sets 1,000,000 and the published runs' count
    is not stated)."""
    from reca.models.showo import ClipShape, PhiShape, ShowoConfig
    from reca.models.showo import CodecConfig as ShowoCodecConfig

    return RunConfig(
        preset=name,
        model=ShowoConfig(llm=PhiShape(), llm_vocab_size=50295, clip=ClipShape(),
                          codec=ShowoCodecConfig(kind="magvit2"), image_size=size,
                          recon_text_tokens=128),  # t2i_clip_recon_prompt's pad_length
        data=DataConfig(batch_size=batch, num_workers=8, crop_scale=1.0, hflip=False),
        sample=SampleConfig(max_text_tokens=128, fixed_prob=0.0),  # bounded by the 128 text ids
        mix=MixConfig(cycle=("recon", "caption"), max_answer_tokens=256),
        optim=OptimConfig(lr=5e-7, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup_steps=1000,
                          warmup_from_zero=True, schedule=schedule, min_lr_ratio=0.0, clip_grad=0.0, grad_accum=10),
        train=TrainConfig(steps=10_000, checkpoint_every=1),
        output=OutputConfig(dir=f"runs/{name}", log_every=10, ckpt_every=1000, preview_every=1000, preview_steps=18),
    )


def showo_1_3b_256() -> RunConfig:
    """Show-o-RecA (CLIP) at 256 px: 256 codes; 4 recon + 4 image-to-text images a micro-step.
    The published run's instructions: `--prompts Show-o/training/consts.py` from the RecA
    authors' repository (HorizonWind2004/reconstruction-alignment)."""
    return _showo("showo-1.3b-256", 256, 4, "cosine")


def showo_1_3b_512() -> RunConfig:
    """Show-o-512x512-RecA (CLIP): 1024 codes; 2 recon + 2 image-to-text images a micro-step.
    The published run's instructions: `--prompts Show-o/training/consts.py` from the RecA
    authors' repository (HorizonWind2004/reconstruction-alignment)."""
    return _showo("showo-1.3b-512", 512, 2, "constant")  # cosine over 1,000,000 steps: constant over these


def janus_tiny() -> RunConfig:
    """Janus-Pro at CPU scale, a tiny random config of transformers' JanusForConditionalGeneration:
    a 2-layer Llama (64 wide) over reca's tiny tokenizer with Janus's eight special tokens, its
    lm_head tied to the embedding table (transformers' JanusConfig default), a 2-layer SigLIP
    (32 px, 8 px patches: 16 visual tokens), a 4-level VQ model (/8: 4 x 4 = 16 codes of a
    256-entry codebook). Janus-Pro's recipe otherwise (janus_pro_1b): the crop unflipped, SigLIP
    and the VQ model frozen, 10 % unconditional rows. The VQ model is random: previews are not
    images."""
    from reca.models.janus import JanusConfig, JanusVisionShape, JanusVQShape, LlamaShape

    return RunConfig(
        preset="janus-tiny",
        model=JanusConfig(
            llm=LlamaShape(vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=4, max_position=1024),
            vision=JanusVisionShape(hidden_size=32, num_layers=2, num_heads=2, image_size=32, patch_size=8),
            vq=JanusVQShape(codebook_size=256, latent_channels=32, base_channels=32, channel_multiplier=(1, 1, 1, 1),
                            num_res_blocks=1),
            tie_word_embeddings=True,
        ),
        data=DataConfig(source="demo", batch_size=8, crop_scale=1.0, hflip=False),
        sample=SampleConfig(max_text_tokens=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=600, precision="fp32"),
        output=OutputConfig(dir="runs/janus-tiny", log_every=10, ckpt_every=200, preview_every=300, preview_steps=1),
    )


def _janus(name: str, llm: LlamaShape, batch: int) -> RunConfig:
    """Janus-Pro's RecA run. Shapes: transformers' JanusConfig defaults (SigLIP-Large-Patch16-384:
    576 visual tokens; VQ-16: 24 x 24 codes of 16,384) with the release's text_config
    (deepseek-community/Janus-Pro-*B config.json; convert_janus_weights_to_hf.py copies
    the original language_config, LlamaConfig's defaults filling what it omits). Both views 384
    px: the understanding input at SigLIP's own size (RecA's bottleneck rule); one square crop,
    short side to 384 (Janus-Pro's generation data: "the short side is resized to 384, and the
    long side is cropped to 384"), unflipped. RecA and image-to-text alternate (Janus shares
    its LLM between the two: the RecA authors' REPRODUCE_GUIDE keeps image-to-text data for
    shared-parameter models; Janus-Pro's stage III mixes understanding and generation 5 : 4);
    captioned images: --set mix.caption_source=DIR. Optimiser as Janus-Pro's stage III (its
    report, Table 2): AdamW lr 4e-5, betas (0.9, 0.95), no weight decay, constant, no warm-up,
    clip 1.0; batch 128 over 8 ranks (16 a rank, each objective). 10 % of the RecA rows are the
    unconditional prompt, so classifier-free guidance (scale 5, generation_inference.py)
    keeps working. Steps: Janus-Pro publishes none for RecA; 5,000 is our choice. SigLIP and
    the VQ model frozen. The real tokenizer comes with --init-from the release directory."""
    from reca.models.janus import JanusConfig, JanusVisionShape, JanusVQShape

    return RunConfig(
        preset=name,
        model=JanusConfig(llm=llm, vision=JanusVisionShape(), vq=JanusVQShape(), tie_word_embeddings=False),
        data=DataConfig(batch_size=batch, num_workers=8, crop_scale=1.0, hflip=False),
        sample=SampleConfig(max_text_tokens=128),
        mix=MixConfig(cycle=("recon", "caption"), max_answer_tokens=256),
        optim=OptimConfig(lr=4e-5, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0, schedule="constant",
                          clip_grad=1.0, grad_accum=2),
        train=TrainConfig(steps=5_000, checkpoint_every=1),
        output=OutputConfig(dir=f"runs/{name}", log_every=10, ckpt_every=500, preview_every=1000, preview_steps=1),
    )


def janus_pro_1b() -> RunConfig:
    """Janus-Pro-1B (deepseek-community/Janus-Pro-1B): DeepSeek-LLM-1.5B (2048 wide, 24 layers,
    16 heads, MLP 5632, vocabulary 102,400, its own lm_head), aligners to 2048."""
    from reca.models.janus import LlamaShape

    return _janus("janus-pro-1b", LlamaShape(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16,
                                             num_kv_heads=16), batch=16)


def janus_pro_7b() -> RunConfig:
    """Janus-Pro-7B (deepseek-community/Janus-Pro-7B): DeepSeek-LLM-7B (4096 wide, 30 layers,
    32 heads, MLP 11008, vocabulary 102,400, its own lm_head), aligners to 4096."""
    from reca.models.janus import LlamaShape

    return _janus("janus-pro-7b", LlamaShape(hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32,
                                             num_kv_heads=32), batch=16)


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "tiny": tiny, "demo": demo, "flow-7b": flow_7b,
    "harmon-tiny": harmon_tiny, "harmon-0.5b": harmon_0_5b, "harmon-1.5b": harmon_1_5b,
    "bagel-tiny": bagel_tiny, "bagel-7b-mot": bagel_7b_mot,
    "openuni-tiny": openuni_tiny, "openuni-b-512": openuni_b_512, "openuni-l-512": openuni_l_512,
    "showo-tiny": showo_tiny, "showo-1.3b-256": showo_1_3b_256, "showo-1.3b-512": showo_1_3b_512,
    "janus-tiny": janus_tiny, "janus-pro-1b": janus_pro_1b, "janus-pro-7b": janus_pro_7b,
}


def preset(name: str) -> RunConfig:
    """A named preset, or `module:function`: a function of no arguments returning a `RunConfig`,
    from any importable module (or a .py file in the working directory)."""
    if ":" in name:
        return _from_module(name)
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(PRESETS)}; or module:function)")
    return PRESETS[name]()


def _from_module(spec: str) -> RunConfig:
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise UserError(f"preset {spec!r}: expected module:function")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path  # `python -m` has the working directory; `reca` not
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(f"preset {spec!r}: cannot import {module_name} ({e})") from None
    except Exception as e:  # a broken module: its error, on one line
        raise UserError(f"preset {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"preset {spec!r}: module {module_name} has no function {fn_name!r}")
    try:
        cfg = fn()
    except (UserError, ValueError) as e:  # a config or model shape refusing a value
        raise UserError(f"preset {spec!r}: {e}") from None
    except TypeError as e:  # most often a function that wants arguments
        raise UserError(f"preset {spec!r}: {fn_name}() must take no arguments and return a RunConfig "
                        f"({' '.join(str(e).split())})") from None
    except Exception as e:  # noqa: BLE001: the user's function failed: its error, on one line
        raise UserError(f"preset {spec!r}: {fn_name}() raised {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, RunConfig):
        raise UserError(f"preset {spec!r}: {fn_name}() returned {type(cfg).__name__}, not a RunConfig")
    # the run remembers the module: plain `reca` imports it again to read the run back (CodeConfig)
    modules = (module_name, *(m for m in cfg.code.modules if m != module_name))
    cfg = dataclasses.replace(cfg, code=dataclasses.replace(cfg.code, modules=modules))
    return cfg if cfg.preset else dataclasses.replace(cfg, preset=spec)
