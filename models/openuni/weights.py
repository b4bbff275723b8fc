"""OpenUni weights in and out: OpenUni's checkpoint layout and the public part directories.

OpenUni's model (`OpenUniInternVL3SANAHF`) saves a flat state dict with the prefixes
`meta_queries`, `connector.`, `projector.`, `transformer.` (diffusers SANA names) and, when its
frozen parts were saved too, `lmm.` (InternVL3's remote-code names: `vision_model.`, `mlp1.`,
`language_model.model.`) and `vae.` (diffusers DC-AE names). `OpenUniModel` keeps OpenUni's names
except inside `lmm.`, which is transformers' `InternVLModel`; `internvl_to_reca` /
`internvl_from_reca` map between the two (the renaming of transformers'
convert_internvl_weights_to_hf.py, and its split of the ViT's fused qkv). A directory for
`load_pretrained` may hold (each part optional, later ones overriding earlier ones):

    DIR/internvl/           InternVL3-1B/2B: the remote-code layout (OpenGVLab/InternVL3-1B) or
                            transformers' "-hf" layout (model.vision_tower., ...); the LM head is dropped
    DIR/transformer/        diffusers SanaTransformer2DModel (e.g. Sana_600M_512px_diffusers/transformer)
    DIR/vae/                diffusers AutoencoderDC (dc-ae-f32c32-sana-1.1-diffusers)
    DIR/*.pth or DIR/openuni.safetensors   one OpenUni checkpoint (RecA's starting point)

Shapes must match the preset exactly; every tensor is used but InternVL3's LM head, and a part
present is whole; an error is one line naming the tensor (`reca.models.loading`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from reca.models.loading import check_release_config, expected_fields, load_into, note, read_checkpoint, read_safetensors

TRAINED = ("meta_queries", "connector.", "projector.", "transformer.")  # what RecA changes; export writes these
FROZEN = ("lmm.", "vae.")
DIFFUSERS_KEYS = (  # the fields of SANA's and DC-AE's config.json that decide shapes or the latent scale
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "num_cross_attention_heads",
    "cross_attention_head_dim", "cross_attention_dim", "caption_channels", "mlp_ratio", "patch_size",
    "latent_channels", "encoder_block_out_channels", "decoder_block_out_channels", "encoder_layers_per_block",
    "decoder_layers_per_block", "scaling_factor")
LM_HEAD = r"(^|\.)lm_head\."  # InternVL3's text head: OpenUni never reads logits

# remote-code InternVL name -> transformers InternVLModel name, applied in order (the conversion script's table)
_TO_RECA = (
    (r"^language_model\.model\.", "language_model."),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
    (r"^vision_model\.", "vision_tower."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.encoder\.layers\.", ".encoder.layer."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
)
_TO_REMOTE = (
    (r"^language_model\.", "language_model.model."),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^vision_tower\.", "vision_model."),
    (r"\.cls_token$", ".class_embedding"),
    (r"\.position_embeddings$", ".position_embedding"),
    (r"\.patch_embeddings\.projection\.", ".patch_embedding."),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
)


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def internvl_to_reca(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternVL3 tensors in the remote-code layout (or transformers' "-hf" layout) -> the names of
    `OpenUniModel.lmm`; the fused ViT `attn.qkv` is split into q/k/v (rows in that order); the LM
    head keeps a `lm_head.` name, which the loaders declare unused (OpenUni never reads logits)."""
    if any(k.startswith(("vision_tower.", "model.vision_tower.")) for k in state):  # already transformers'
        out = {}
        for k, v in state.items():
            k = k[len("model."):] if k.startswith("model.") else k
            k = "language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.") else k
            out[k] = v  # the LM head too: the loader declares it unused
        return out
    out = {}
    for key, value in state.items():
        new = _rename(key, _TO_RECA)
        if new.endswith((".attention.qkv.weight", ".attention.qkv.bias")):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[new.replace(".qkv.", f".{name}.")] = part
        else:
            out[new] = value
    return out


def internvl_from_reca(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `internvl_to_reca` for `lmm.` tensors (names without the prefix): InternVL3's
    remote-code layout, q/k/v fused back into `attn.qkv`."""
    out, qkv = {}, {}
    for key, value in state.items():
        m = re.search(r"\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if m and key.startswith("vision_tower."):
            qkv.setdefault(key[: m.start()] + f".attention.qkv.{m.group(2)}", {})[m.group(1)] = value
        else:
            out[_rename(key, _TO_REMOTE)] = value
    for key, parts in qkv.items():
        out[_rename(key, _TO_REMOTE)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openuni_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under OpenUni's names (queries, connector, projector, SANA)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED)}


def export_openuni(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the trained parts where OpenUni's `load_state_dict(strict=False)` reads them
    (`pretrained_pth`): `.safetensors` or a torch `.pth`. The frozen InternVL3 and DC-AE are the
    public ones and are not written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in openuni_state_dict(model).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def load_openuni_checkpoint(model: torch.nn.Module, path: str | Path) -> int:
    """Copy an OpenUni checkpoint into `model`; returns how many tensors were set. Queries,
    connector and projector must all be present; SANA, InternVL3 (`lmm.`, remote-code names)
    and DC-AE may be, each then whole; nothing else may (InternVL3's LM head is not used)."""
    state = read_checkpoint(path)
    lmm = internvl_to_reca({k[len("lmm."):]: v for k, v in state.items() if k.startswith("lmm.")})
    state = {k: v for k, v in state.items() if not k.startswith("lmm.")} | {f"lmm.{k}": v for k, v in lmm.items()}
    present = {p for p in ("transformer.", "lmm.", "vae.") if any(k.startswith(p) for k in state)}
    absent = tuple(p for p in ("transformer.", "lmm.", "vae.") if p not in present)
    return load_into(model, state, Path(path).name, unused=(LM_HEAD,),
                     optional=(lambda k: k.startswith(absent) if absent else False,))


def _one_export(root: Path) -> list[Path]:
    """openuni.safetensors and openuni.pth side by side (reca export): the safetensors file is
    read, once the .pth is seen to hold the same tensors (keys and shapes, from its header)."""
    from reca.models.loading import headers_only

    with headers_only():
        a, b = read_checkpoint(root / "openuni.safetensors"), read_checkpoint(root / "openuni.pth")
    if {k: tuple(v.shape) for k, v in a.items()} != {k: tuple(v.shape) for k, v in b.items()}:
        raise ValueError(f"{root}: openuni.pth and openuni.safetensors hold different tensors; keep one")
    note("openuni.pth: the same tensors as openuni.safetensors, read once")
    return [root / "openuni.safetensors"]


def _release_drop_path(path: Path) -> float:
    """InternVL3's `vision_config.drop_path_rate` from its config.json (0 without one)."""
    if not path.exists():
        return 0.0
    try:
        rate = json.loads(path.read_text())["vision_config"].get("drop_path_rate", 0.0)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an InternVL config ({type(e).__name__}: {e})") from None
    if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"{path}: vision_config.drop_path_rate must be in [0, 1), got {rate!r}")
    return float(rate)


def load_pretrained(model: torch.nn.Module, directory: str | Path) -> dict[str, int]:
    """Load whatever parts `directory` holds (see the module docstring); a file is read as an
    OpenUni checkpoint. Returns the number of tensors set per part."""
    root = Path(directory)
    if root.is_file():
        return {root.name: load_openuni_checkpoint(model, root)}
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    loaded: dict[str, int] = {}
    if model.cfg.vit.drop_path_rate < 0:  # the rate of the release's own config, as OpenUni's trainer applies it
        rate = _release_drop_path(root / "internvl" / "config.json")
        model.set_vit_drop_path(rate)
        note(f"InternViT drop path {rate} (" + ("internvl/config.json" if (root / "internvl" / "config.json").exists()
                                                else "no internvl/config.json") + ")")
    if (root / "internvl").is_dir():
        lc = model.lmm.config
        check_release_config(root / "internvl" / "config.json", expected_fields(lc.vision_config, image_size=None),
                             "internvl/config.json vision_config", section="vision_config")
        check_release_config(root / "internvl" / "config.json", expected_fields(lc.text_config, tie_word_embeddings=None),
                             "internvl/config.json llm_config", section=("llm_config", "text_config"))
        loaded["internvl/"] = load_into(model.lmm, internvl_to_reca(read_safetensors(root / "internvl")), "internvl/",
                                        unused=(LM_HEAD,))
    for part in ("transformer", "vae"):
        if (root / part).is_dir():
            check_release_config(root / part / "config.json", expected_fields(getattr(model, part).config, DIFFUSERS_KEYS),
                                 f"{part}/config.json")
            loaded[part + "/"] = load_into(getattr(model, part), read_safetensors(root / part), part + "/")
    checkpoints = sorted(root.glob("*.pth")) + [p for p in (root / "openuni.safetensors",) if p.exists()]
    if len(checkpoints) == 2 and {p.name for p in checkpoints} == {"openuni.pth", "openuni.safetensors"}:
        checkpoints = _one_export(root)  # reca export writes both forms of one checkpoint
    if len(checkpoints) > 1:
        names = ", ".join(p.name for p in checkpoints)
        raise ValueError(f"{root} holds {len(checkpoints)} OpenUni checkpoints ({names}); keep one")
    if checkpoints:
        loaded[checkpoints[0].name] = load_openuni_checkpoint(model, checkpoints[0])
    if not loaded:
        raise ValueError(f"{root} holds none of internvl/, transformer/, vae/, *.pth, openuni.safetensors")
    return loaded
