"""`--init-from DIR` takes each family's public release directory as downloaded, written here at
tiny scale with the releases' file names, config keys and tensor keys: the tokenizer is read
from DIR (a 512-token one, so a run that fell back to reca's own 1,024-token tokenizer would
show), the config files are checked against the preset, every tensor loads, and `reca train`
trains from it."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from reca.engine.build import seeded_model
from reca.engine.cli import main
from reca.engine.config import apply_overrides, load_config
from reca.engine.presets import preset
from reca.kernels import get_ops
from reca.models.janus.vocab import SPECIALS as JANUS_SPECIALS
from reca.models.tokenizer import tiny_tokenizer


def _donor(name: str, tokenizer_dir):
    # a Janus release's tokenizer has Janus's special tokens
    tiny_tokenizer(512, *([JANUS_SPECIALS] if name == "janus-tiny" else [])).save(str(tokenizer_dir))
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=str(tokenizer_dir)))
    return seeded_model(cfg, get_ops("torch"), torch.device("cpu"))


def _qwen2_release(llm, directory, tokenizer_dir):
    """A Hugging Face Qwen2 directory as released: Qwen2ForCausalLM keys (model. prefix, lm_head)."""
    from transformers import Qwen2ForCausalLM

    full = Qwen2ForCausalLM(llm.config)
    full.model.load_state_dict(llm.state_dict())
    full.save_pretrained(str(directory), safe_serialization=True)
    tiny_tokenizer(512).save(str(directory))


def _longer(model_cls, config, state, directory):
    """A vision tower one layer longer than the family builds (it reads the second-to-last layer)."""
    config = config.__class__(**{**config.to_dict(), "num_hidden_layers": config.num_hidden_layers + 1})
    tower = model_cls(config)
    missing, _ = tower.load_state_dict(state, strict=False)
    assert all(".layers." in k for k in missing)  # only the extra layer is the donor's own
    tower.save_pretrained(str(directory), safe_serialization=True)


def write_flow(m, d):
    _qwen2_release(m.llm, d / "llm", d / "llm")
    _longer(type(m.vit), m.vit.config, m.vit.state_dict(), d / "vit")
    rest = {k: v.contiguous() for k, v in m.state_dict().items() if not k.startswith(("llm.", "vit.", "codec."))}
    save_file(rest, str(d / "model.safetensors"))
    return d / "llm"


def write_harmon(m, d):
    m.llm.save_pretrained(str(d / "llm"), safe_serialization=True)
    tiny_tokenizer(512).save(str(d / "llm"))
    m.export(str(d / "harmon_tiny.pth"))
    return d / "llm"


def write_bagel(m, d):
    m.export(str(d / "ema.safetensors"))
    q, v = m.cfg.llm, m.cfg.vit
    (d / "llm_config.json").write_text(q.hf_config().to_json_string())
    (d / "vit_config.json").write_text(json.dumps({
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "patch_size": v.patch_size, "image_size": v.max_side * v.patch_size,
        "layer_norm_eps": v.layer_norm_eps, "model_type": "siglip_vision_model"}))
    tiny_tokenizer(512).save(str(d))
    return d


def write_openuni(m, d):
    from reca.models.openuni.weights import internvl_from_reca

    (d / "internvl").mkdir()
    remote = internvl_from_reca(m.lmm.state_dict())
    remote["language_model.lm_head.weight"] = torch.zeros(m.cfg.llm.vocab_size, m.cfg.llm.hidden_size)
    save_file({k: v.contiguous() for k, v in remote.items()}, str(d / "internvl" / "model.safetensors"))
    (d / "internvl" / "config.json").write_text(json.dumps({  # InternVL3's remote-code config keys
        "architectures": ["InternVLChatModel"], "vision_config": m.lmm.config.vision_config.to_dict(),
        "llm_config": m.lmm.config.text_config.to_dict()}, default=str))
    tiny_tokenizer(512).save(str(d / "internvl"))
    m.transformer.save_pretrained(str(d / "transformer"))
    m.vae.save_pretrained(str(d / "vae"))
    m.export(str(d / "openuni_tiny.pth"))
    return d / "internvl"


def write_showo(m, d):
    from transformers import PhiForCausalLM

    m.export(str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "_class_name": "Showo", "w_clip_vit": True, "vocab_size": m.layout.size, "llm_vocab_size": m.layout.text,
        "codebook_size": m.vq.codebook_size, "num_vq_tokens": m.num_codes, "llm_model_path": "microsoft/phi-1_5"}))
    phi_cfg = m.cfg.llm.hf_config(m.layout.text)
    phi_cfg.qk_layernorm = False  # Phi-1.5 itself has none: Show-o adds them
    phi = PhiForCausalLM(phi_cfg)
    own = m.showo.state_dict()
    phi.load_state_dict({k: (v[:m.layout.text] if k in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")
                             else v) for k, v in own.items() if "_layernorm" not in k or "self_attn" not in k})
    phi.save_pretrained(str(d / "phi"), safe_serialization=True)
    tiny_tokenizer(512).save(str(d / "phi"))
    _longer(type(m.clip), m.clip.config, m.clip.state_dict(), d / "clip")
    return d / "phi"


def write_janus(m, d):
    """deepseek-community/Janus-Pro-*B as on the hub: what transformers' save_pretrained writes
    (config.json, generation_config.json, model-0000k-of-0000n.safetensors with
    model.safetensors.index.json; a tied lm_head left out), the tokenizer's files and the processor's."""
    m.janus.save_pretrained(str(d), max_shard_size="300KB")
    m.tokenizer.save(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "JanusImageProcessor", "size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "background_color": [127] * 3, "min_size": 14, "processor_class": "JanusProcessor"}))
    (d / "processor_config.json").write_text(json.dumps({"num_image_tokens": 16, "processor_class": "JanusProcessor"}))
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").exists()
    return d


LAYOUTS = {"tiny": write_flow, "harmon-tiny": write_harmon, "bagel-tiny": write_bagel,
           "openuni-tiny": write_openuni, "showo-tiny": write_showo, "janus-tiny": write_janus}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_release_directory_as_downloaded_trains(tmp_path, capsys, name):
    if name == "openuni-tiny":
        pytest.importorskip("diffusers")
    donor = _donor(name, tmp_path / "tokenizer")
    release = tmp_path / "release"
    release.mkdir()
    where = LAYOUTS[name](donor, release)
    cfg = apply_overrides(preset(name), [f"train.init_from={release}"])
    loaded = seeded_model(cfg, get_ops("torch"), torch.device("cpu"))
    base = getattr(loaded.tokenizer, "base", loaded.tokenizer)  # Show-o extends its text tokenizer
    assert base.vocab_size == 512  # the release's tokenizer, found without --set model.tokenizer
    want = donor.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert "agrees with the preset" in loaded.init_from_report, loaded.init_from_report
    run = tmp_path / "run"
    main(["train", "--preset", name, "--init-from", str(release), "--out", str(run), "--steps", "2", "--quiet",
          "--set", "sample.max_text_tokens=64"])  # the 512-token BPE splits the instructions finer
    assert load_config(run / "config.json").model.tokenizer == str(where)
    assert (run / "checkpoint.pt").exists()


def test_a_release_config_that_disagrees_is_one_line(tmp_path, capsys):
    donor = _donor("bagel-tiny", tmp_path / "tokenizer")
    release = tmp_path / "release"
    release.mkdir()
    write_bagel(donor, release)
    config = json.loads((release / "vit_config.json").read_text())
    config["num_attention_heads"] += 1
    (release / "vit_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "bagel-tiny", "--init-from", str(release), "--out", str(tmp_path / "run"),
              "--steps", "1", "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert f"vit_config.json: num_attention_heads is {config['num_attention_heads']} there but the preset builds " \
           f"{config['num_attention_heads'] - 1}" in lines[0]


def test_openuni_export_pth_is_in_the_format_torch_2_3_reads(tmp_path):
    """OpenUni's trainer pins torch 2.3 and reads `pretrained_pth` with torch.load: the .pth
    reca export writes is torch's zip format (version record <= 6, what 2.3's reader takes), its
    pickle (protocol 2) names only what 2.3 has: _rebuild_tensor_v2, typed storages, OrderedDict."""
    import pickletools
    import zipfile

    pytest.importorskip("diffusers")
    from reca.engine.generate import export

    model = seeded_model(preset("openuni-tiny"), get_ops("torch"), torch.device("cpu"))
    paths = export(model, preset("openuni-tiny"), str(tmp_path / "export"))
    assert [p.name for p in paths] == ["openuni.safetensors", "openuni.pth"]
    z = zipfile.ZipFile(paths[1])
    prefix = z.namelist()[0].split("/")[0]
    assert int(z.read(f"{prefix}/version")) <= 6
    data = z.read(f"{prefix}/data.pkl")
    assert data[:2] == b"\x80\x02"
    strings = [arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")] + [
        f"{a} {b}" for a, b in _stack_globals(data)]
    known = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict"}
    assert strings and all(s in known or (s.startswith("torch ") and s.endswith("Storage")) for s in strings), strings
    back = torch.load(paths[1], weights_only=True)
    assert back.keys() == model.state_dict().keys() - {k for k in model.state_dict() if k.startswith(("lmm.", "vae."))}


def _stack_globals(data: bytes):
    """The (module, name) pairs of protocol-2 pickles' GLOBAL opcodes (pickletools gives them as
    one 'module name' string) and of STACK_GLOBAL after two string pushes."""
    import pickletools

    last = []
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            last = (last + [arg])[-2:]
        if op.name == "STACK_GLOBAL" and len(last) == 2:
            yield tuple(last)


def test_info_checks_a_release_with_its_own_tokenizer(tmp_path, capsys):
    """reca info --init-from reads the release's tokenizer too: Show-o's vocabulary depends on it."""
    donor = _donor("showo-tiny", tmp_path / "tokenizer")
    release = tmp_path / "release"
    release.mkdir()
    write_showo(donor, release)
    main(["info", "--preset", "showo-tiny", "--init-from", str(release)])
    out = capsys.readouterr().out
    assert "config.json agrees with the preset" in out and "phi/ " in out, out
