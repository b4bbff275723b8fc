"""Named presets: plain functions returning a complete `RunConfig`; the CLI only overrides fields."""
from __future__ import annotations

from typing import Callable

from reca.engine.config import DataConfig, OptimConfig, OutputConfig, RunConfig, SampleConfig, TrainConfig
from reca.engine.errors import UserError
from reca.models.flow import FlowConfig, Qwen2Shape, SiglipShape
from reca.models.vae import VAEConfig, flux_vae_config


def tiny() -> RunConfig:
    """The embedded default: a ~3M-parameter flow-matching model, 32 px images, a pixel-patch
    "VAE" (reconstructions are viewable), trained on photographs bundled with scikit-image.
    Several steps per second on two CPU cores."""
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


def flow_7b() -> RunConfig:
    """Real-size flow-matching preset in BAGEL's shapes: Qwen2-7B-shaped LLM, SigLIP-so400m/14
    at 224 px (256 visual tokens), FLUX-shaped VAE (16 latent channels, /8) at 512 px, 2 x 2
    latent patches (1024 generation tokens). BAGEL's optimiser: lr 4e-5, eps 1e-15, no weight
    decay, constant after 1000 warm-up steps. Understanding encoder, connector and VAE frozen."""
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
            gradient_checkpointing=True,
        ),
        data=DataConfig(batch_size=24, num_workers=8),
        optim=OptimConfig(lr=4e-5, eps=1e-15, weight_decay=0.0, warmup_steps=1000, schedule="constant"),
        train=TrainConfig(steps=10_000),
        output=OutputConfig(dir="runs/flow-7b", log_every=10, ckpt_every=1000, preview_every=1000, preview_steps=30),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "flow-7b": flow_7b}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
