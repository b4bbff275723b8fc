"""Harmon weights in and out: the public checkpoint layout (a flat state dict with the prefixes
`llm.`, `proj_in.`, `proj_out.`, `mar.`; see HARMON_LAYOUT.md) and local Qwen2.5 / KL-16 files.

`HarmonModel`'s parameter names equal the layout's, so loading and export are a filter on the
prefix, never a renaming table. A directory for `load_pretrained` may hold (each part optional,
later ones overriding earlier ones):

    DIR/llm/                 a Hugging Face Qwen2.5 directory (Qwen2ForCausalLM keys, lm_head optional when tied)
    DIR/*.pth                one Harmon checkpoint (torch.load(weights_only=True)), or
    DIR/harmon.safetensors   the same as safetensors
    DIR/vae.safetensors, DIR/vae/ or DIR/kl16.ckpt   the KL-16 VAE (LDM AutoencoderKL keys;
                             MAR's kl16.ckpt wraps them in {"model": ...})

Shapes must match the preset exactly; an error is one line naming the tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reca.models.loading import load_into, read_safetensors

PREFIXES = ("llm.", "proj_in.", "proj_out.", "mar.")
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some transformers releases saved; rebuilt from the config


def harmon_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in Harmon's layout: every `llm.`/`proj_in.`/`proj_out.`/`mar.` entry
    (the tied `llm.lm_head.weight` included, as in the public files), no VAE."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(PREFIXES) and not k.endswith(_IGNORED)}


def export_harmon(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the weights where Harmon's own code loads them: `.safetensors` or a torch `.pth`.
    Tensors are cloned to the CPU (tied weights become two entries, as safetensors requires)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in harmon_state_dict(model).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from `.safetensors` or a torch file (tensors only: weights_only=True);
    a single wrapping key ("model", "state_dict", "module") is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return state


def load_harmon_checkpoint(model: torch.nn.Module, path: str | Path) -> int:
    """Copy a Harmon-layout checkpoint into `model`; returns how many tensors were set. Every
    parameter under the four prefixes must be present (the LM head may be absent when tied), and
    no other key may be."""
    state = {k: v for k, v in read_checkpoint(path).items() if not k.endswith(_IGNORED)}
    own = harmon_state_dict(model)
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys that a Harmon model of this preset does not have, "
                         f"e.g. {unexpected[0]}")
    params = {n for n, _ in model.named_parameters() if n.startswith(PREFIXES)}  # tied head listed once
    missing = sorted(params - state.keys())
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    return load_into(model, state, str(path), strict=False)


def load_vae(model: torch.nn.Module, path: Path) -> int:
    state = read_safetensors(path) if path.suffix == ".safetensors" or path.is_dir() else read_checkpoint(path)
    state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIXES)}  # LDM files also hold loss.*
    return load_into(model.codec, state, str(path))


def load_pretrained(model: torch.nn.Module, directory: str | Path) -> dict[str, int]:
    """Load whatever parts `directory` holds (see the module docstring); a file is read as a
    Harmon checkpoint. Returns the number of tensors set per part."""
    root = Path(directory)
    if root.is_file():
        return {"harmon": load_harmon_checkpoint(model, root)}
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if (root / "llm").is_dir():
        state = {k: v for k, v in read_safetensors(root / "llm").items() if not k.endswith(_IGNORED)}
        loaded["llm"] = load_into(model.llm, state, "llm")
    checkpoints = sorted(root.glob("*.pth")) + [p for p in (root / "harmon.safetensors",) if p.exists()]
    if len(checkpoints) > 1:
        names = ", ".join(p.name for p in checkpoints)
        raise ValueError(f"{root} holds {len(checkpoints)} Harmon checkpoints ({names}); keep one")
    if checkpoints:
        loaded["harmon"] = load_harmon_checkpoint(model, checkpoints[0])
    for vae in (root / "vae.safetensors", root / "vae", root / "kl16.ckpt"):
        if vae.exists():
            loaded["vae"] = load_vae(model, vae)
            break
    if not loaded:
        raise ValueError(f"{root} holds none of llm/, *.pth, harmon.safetensors, vae.safetensors, vae/, kl16.ckpt")
    return loaded
