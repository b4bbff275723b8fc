"""`--init-from DIR`: real weights from local Hugging Face-format directories (written here)."""
import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from reca.engine.config import apply_overrides
from reca.engine.presets import tiny
from reca.engine.train import build


def _donors(cfg):
    q, v = cfg.model.llm, cfg.model.vit
    torch.manual_seed(123)
    llm = Qwen2ForCausalLM(q.hf_config(tie_word_embeddings=False))
    vit = SiglipVisionModel(SiglipVisionConfig(  # the full encoder, last layer included
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size))
    return llm, vit


def test_init_from_hf_directories(tmp_path):
    cfg = apply_overrides(tiny(), [f"output.dir={tmp_path / 'run'}"])
    llm, vit = _donors(cfg)
    llm.save_pretrained(tmp_path / "w" / "llm", safe_serialization=True)
    vit.save_pretrained(tmp_path / "w" / "vit", safe_serialization=True)
    gen_in = {"gen_in.weight": torch.randn(cfg.model.llm.hidden_size, 48), "gen_in.bias": torch.randn(cfg.model.llm.hidden_size)}
    save_file(gen_in, str(tmp_path / "w" / "model.safetensors"))

    fresh = build(cfg).model
    loaded = build(apply_overrides(cfg, [f"train.init_from={tmp_path / 'w'}"])).model
    src = llm.model.state_dict()
    for name, p in loaded.llm.state_dict().items():
        assert torch.equal(p, src[name]), name
        if p.ndim == 2:  # matrices are random: a load that did nothing would fail here
            assert not torch.equal(fresh.llm.state_dict()[name], src[name]), name
    vsrc = {k.removeprefix("vision_model."): t for k, t in vit.state_dict().items()}
    for name, p in loaded.vit.state_dict().items():
        assert torch.equal(p, vsrc[name.removeprefix("vision_model.")]), name
    torch.testing.assert_close(loaded.gen_in.weight.detach(), gen_in["gen_in.weight"])
    # the second-to-last layer's features: the loaded (L-1)-layer encoder + post-LN matches the donor's
    x = torch.randn(2, 3, cfg.model.vit.image_size, cfg.model.vit.image_size)
    with torch.no_grad():
        ref = vit(pixel_values=x, output_hidden_states=True)
        want = vit.post_layernorm(ref.hidden_states[-2]) if hasattr(vit, "post_layernorm") \
            else vit.vision_model.post_layernorm(ref.hidden_states[-2])
        got = loaded.vit(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    cfg = apply_overrides(tiny(), ["model.llm.hidden_size=64", "model.llm.intermediate_size=96"])
    llm, _ = _donors(cfg)
    llm.save_pretrained(tmp_path / "w" / "llm", safe_serialization=True)
    proc = subprocess.run([sys.executable, "-m", "reca.engine", "train", "--init-from", str(tmp_path / "w"),
                           "--out", str(tmp_path / "run"), "--steps", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # the release's config.json is read first: the field and both values
    assert "llm/config.json: hidden_size is 64 there but the preset builds 192" in proc.stderr, proc.stderr
    # without it, the tensors' shapes say the same
    (tmp_path / "w" / "llm" / "config.json").unlink()
    model = build(apply_overrides(tiny(), [f"output.dir={tmp_path / 'run2'}"])).model
    from reca.models.loading import load_pretrained
    import pytest
    with pytest.raises(ValueError, match=r"llm/: .* has shape .* in the checkpoint but the model builds"):
        load_pretrained(model, tmp_path / "w")
