"""Janus weights in and out, in the transformers-format release layout (deepseek-community/
Janus-Pro-1B and -7B on the Hugging Face hub, written by transformers' convert_janus_weights_to_hf.py):

    DIR/config.json                      JanusConfig: text_config (Llama), vision_config, vq_config
    DIR/model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json   DeepSeek-LLM's, Janus's specials
    DIR/preprocessor_config.json, processor_config.json, generation_config.json, chat_template.jinja

The tensors carry `JanusForConditionalGeneration`'s names (`model.language_model.*`,
`model.vision_model.*`, `model.vqmodel.*`, `model.generation_*`, `model.aligner.*`, `lm_head.weight`);
`JanusModel` holds that class as `janus`, so they load as they are. Every tensor of the release
is used (SigLIP and the VQ model included) and every parameter must be there; the config's
shapes are checked against the preset. `export_release` writes config.json, model.safetensors
and the tokenizer: a directory `JanusForConditionalGeneration.from_pretrained` and
`--init-from` read back (the processor files are the release's own: copy them beside).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from reca.models.loading import INV_FREQ, POSITION_IDS, check_release_config, expected_fields, load_into, read_safetensors

HEAD, EMBED = "lm_head.weight", "model.language_model.embed_tokens.weight"
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "rope_theta")
VISION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size", "patch_size",
               "projection_dim", "depth")
VQ_KEYS = ("embed_dim", "num_embeddings", "latent_channels", "base_channels", "channel_multiplier", "num_res_blocks",
           "projection_dim", "image_token_embed_dim")


def load_pretrained(model, directory: str | Path) -> dict[str, int]:
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--init-from directory not found: {root}")
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{root} holds no model.safetensors (a transformers-format Janus release: config.json and "
                         "model.safetensors, or its shards with model.safetensors.index.json; deepseek-ai's original "
                         "pytorch_model.bin converts with transformers' convert_janus_weights_to_hf.py)")
    hf = model.janus.config
    config = root / "config.json"
    check_release_config(config, {"model_type": "janus", "image_token_id": model.image_token_id}, "config.json")
    check_release_config(config, expected_fields(hf.text_config, TEXT_KEYS), "config.json text_config",
                         section="text_config")
    check_release_config(config, expected_fields(hf.vision_config, VISION_KEYS), "config.json vision_config",
                         section="vision_config")
    check_release_config(config, expected_fields(hf.vq_config, VQ_KEYS), "config.json vq_config", section="vq_config")
    state = read_safetensors(root)
    name = shards[0] if len(shards) == 1 else f"{shards[0]} (+{len(shards) - 1} shards)"
    if model.cfg.tie_word_embeddings and HEAD in state:
        head, embed = state.pop(HEAD), state.get(EMBED)
        if embed is not None and head.device.type != "meta" and not torch.equal(head, embed):
            raise ValueError(f"{name}: {HEAD} differs from {EMBED}: the release's lm_head is its own; "
                             "--set model.tie_word_embeddings=false")
    # rotary frequencies and SigLIP's position ids: buffers some transformers versions saved,
    # rebuilt from the config
    return {name: load_into(model.janus, state, name, unused=(INV_FREQ, POSITION_IDS))}


def export_release(model, path: str | Path) -> Path:
    """`path` (model.safetensors: every tensor, a tied lm_head once, under its embedding's
    name, as transformers saves it) and config.json and the tokenizer in its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.janus.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop(HEAD)
    save_file(state, str(path), metadata={"format": "pt"})
    config = copy.deepcopy(model.janus.config)
    config.architectures = ["JanusForConditionalGeneration"]
    config.save_pretrained(str(path.parent))
    model.tokenizer.save(str(path.parent))
    return path
