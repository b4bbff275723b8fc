"""BAGEL-7B-MoT's released layout in and out.

The release holds `Bagel.state_dict()` dumped whole (FSDP FULL_STATE_DICT): `model.safetensors`
and `ema.safetensors` with keys `language_model.*`, `vit_model.vision_model.*`, `connector.*`,
`time_embedder.mlp.{0,2}.*`, `vae2llm.*`, `llm2vae.*` and the two fixed tables
`latent_pos_embed.pos_embed` / `vit_pos_embed.pos_embed`, which BAGEL pops on load and rebuilds;
the FLUX VAE is a separate `ae.safetensors` (LDM AutoencoderKL keys) [R: FAMILY_FACTS A2]. The
exact key strings are derived from BAGEL's module names, which `BagelModel` reuses, so loading
and export are a filter, never a renaming table.

A directory for `load_bagel` is the release as downloaded: `ema.safetensors` (preferred: RecA
starts model and EMA from it) or `model.safetensors`, optionally `ae.safetensors`, and its
`llm_config.json` / `vit_config.json` (checked against the preset's shapes) and Qwen2 tokenizer
files (read as the run's tokenizer: `reca.engine.build.with_release_tokenizer`). Shapes must match exactly; every
parameter outside the VAE must be present, and every tensor is used but the two fixed tables;
an error is one line naming the tensor (`reca.models.loading`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from reca.models.loading import check_release_config, expected_fields, load_into, read_safetensors

FIXED_TABLES = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")


def bagel_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the release's `model.safetensors`, by its key: all parameters but the
    VAE's, plus the two fixed sin-cos tables."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("codec.")}
    for key in FIXED_TABLES:
        state[key] = model.get_buffer(key)
    return state


def export_bagel(model: torch.nn.Module, path: str | Path) -> Path:
    """Write `path` (a `.safetensors` file, or a directory that receives `model.safetensors`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in bagel_state_dict(model).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def load_bagel(model: torch.nn.Module, directory: str | Path) -> dict[str, int]:
    """Load a BAGEL checkpoint directory into `model`; returns tensors set per file."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    weights = next((root / f for f in ("ema.safetensors", "model.safetensors") if (root / f).exists()), None)
    if weights is None:
        raise ValueError(f"{root} holds neither ema.safetensors nor model.safetensors (BAGEL's layout)")
    q, v = model.cfg.llm, model.cfg.vit  # BAGEL reads both files, then sets qk_norm and untied embeddings itself
    check_release_config(root / "llm_config.json", expected_fields(q.hf_config(), tie_word_embeddings=None),
                         "llm_config.json")
    check_release_config(root / "vit_config.json", {
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "patch_size": v.patch_size, "image_size": v.max_side * v.patch_size,
        "layer_norm_eps": v.layer_norm_eps}, "vit_config.json")
    # the two fixed sin-cos tables BAGEL pops on load and rebuilds from the config: not used
    loaded = {weights.name: load_into(model, read_safetensors(weights), weights.name,
                                      unused=tuple(f"^{re.escape(k)}$" for k in FIXED_TABLES),
                                      optional=(r"^codec\.",))}  # the VAE is ae.safetensors
    if (root / "ae.safetensors").exists():
        loaded["ae.safetensors"] = load_into(model.codec, read_safetensors(root / "ae.safetensors"), "ae.safetensors")
    return loaded
