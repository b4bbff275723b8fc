"""Loading pretrained weights from a local directory (`reca train --init-from DIR`).

    DIR/llm/    a Hugging Face Qwen2 directory (config.json + *.safetensors, sharded or not);
                `Qwen2ForCausalLM` keys ("model." prefix, lm_head) are accepted
    DIR/vit/    a Hugging Face SigLIP vision directory ("vision_model." prefix accepted; the
                last layer and the pooling head are dropped: the family uses the
                second-to-last layer's features)
    DIR/vae/    or DIR/vae.safetensors: latent-diffusion AutoencoderKL keys (e.g. FLUX's ae)
    DIR/model.safetensors   any of the model's own parameters by their reca names
                (connector, gen_in, ...), e.g. a previous reca export

Every part is optional, but each present part must match the configured shapes exactly.
Errors are `ValueError` with one line that names the tensor and both shapes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of every shard in a directory."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    files = [path / f for f in files] if files else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True) -> int:
    """Copy matching tensors into `module`'s parameters and buffers; returns how many were set.
    With `strict`, every parameter of `module` must be present in `state`."""
    own = dict(module.state_dict())
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)} in the checkpoint but the "
                             f"model builds {tuple(own[key].shape)}; choose the preset (or --set model.*) that matches")
    params = {n for n, _ in module.named_parameters()}
    missing = sorted(params - state.keys())
    if strict and missing:
        raise ValueError(f"{where}: the checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    matched = {k: v for k, v in state.items() if k in own}
    with torch.no_grad():
        for key, value in matched.items():
            own[key].copy_(value)
    return len(matched)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, directory: str | Path) -> dict[str, int]:
    """Load whatever parts `directory` holds into a flow-family model; returns tensors per part."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if (root / "llm").is_dir():
        state = _strip(read_safetensors(root / "llm"), "model.")
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
        loaded["llm"] = load_into(model.llm, state, "llm")
    if (root / "vit").is_dir():
        state = _strip(read_safetensors(root / "vit"), "vision_model.")
        kept = model.vit.config.num_hidden_layers  # the last pretrained layer is never built

        def wanted(key: str) -> bool:
            layer = re.match(r"encoder\.layers\.(\d+)\.", key)
            return not key.startswith("head.") and (layer is None or int(layer.group(1)) < kept)

        # transformers releases differ on whether SiglipVisionModel nests a `vision_model`.
        own = "vision_model." if any(k.startswith("vision_model.") for k in model.vit.state_dict()) else ""
        state = {own + k: v for k, v in state.items() if wanted(k)}
        loaded["vit"] = load_into(model.vit, state, "vit")
    vae = root / "vae.safetensors" if (root / "vae.safetensors").exists() else root / "vae"
    if vae.exists():
        loaded["vae"] = load_into(model.codec, read_safetensors(vae), "vae")
    if (root / "model.safetensors").exists():
        loaded["model"] = load_into(model, read_safetensors(root / "model.safetensors"), "model", strict=False)
    if not loaded:
        raise ValueError(f"{root} holds none of llm/, vit/, vae/, vae.safetensors, model.safetensors")
    return loaded
