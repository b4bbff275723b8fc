"""Each family's data recipe and schedule as the public code has it (issue: exactly the paper's
runs), pinned on the presets and on the data path: BAGEL's whole unflipped images, OpenUni's
crop2square offset and its frozen ViT's drop path, the warm-up of each family."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from reca.engine.config import apply_overrides
from reca.engine.data.decode import crop_box
from reca.engine.presets import preset
from reca.models.adapter import ViewSpec

VIEWS = ViewSpec(und_size=8, und_mean=(0.5,) * 3, und_std=(0.5,) * 3, gen_size=8, gen_resize="crop")


def test_bagel_takes_whole_images_unflipped():
    """BAGEL's public run: data/transforms.py resizes, never crops or flips (example.yaml)."""
    data = preset("bagel-7b-mot").data
    assert data.crop_scale == 1.0 and data.hflip is False and data.square_offset == "centre"


@pytest.mark.parametrize("name", ["openuni-b-512", "openuni-l-512"])
def test_openuni_presets_follow_crop2square_and_the_release_drop_path(name):
    cfg = preset(name)
    assert cfg.data.square_offset == "random" and cfg.data.crop_scale == 1.0 and not cfg.data.hflip
    assert cfg.model.vit.drop_path_rate == -1.0  # the rate of DIR/internvl/config.json


def test_crop2square_offset_is_uniform_and_a_pure_function_of_the_draws():
    """OpenUni's crop2square: x0 = randint(0, w - h) for a wide image, y0 for a tall one, the
    short side whole; reca draws it from the sample's own generator, so a resume repeats it."""
    cfg = dataclasses.replace(preset("openuni-b-512").data)
    seen = set()
    for k in range(400):
        box, flip = crop_box(30, 20, VIEWS, cfg, np.random.default_rng([7, k]))
        x0, y0, x1, y1 = box
        assert (y0, y1, x1 - x0) == (0, 20, 20) and 0 <= x0 <= 10 and not flip
        assert box == crop_box(30, 20, VIEWS, cfg, np.random.default_rng([7, k]))[0]
        seen.add(x0)
    assert seen == set(range(11))  # every offset of [0, w - h]
    tall = {crop_box(20, 31, VIEWS, cfg, np.random.default_rng([1, k]))[0] for k in range(400)}
    assert {b[1] for b in tall} == set(range(12)) and all(b[0] == 0 and b[2] == 20 for b in tall)
    centre = dataclasses.replace(cfg, square_offset="centre")
    assert crop_box(30, 20, VIEWS, centre, np.random.default_rng(0))[0] == (5, 0, 25, 20)


def test_square_offset_is_validated():
    from reca.engine.errors import UserError

    with pytest.raises(UserError, match="square_offset"):
        apply_overrides(preset("tiny"), ["data.square_offset=left"])


# --- OpenUni: the frozen InternViT in train mode ----------------------------------------------------

def _openuni(**vit):
    pytest.importorskip("diffusers")
    from reca.kernels import get_ops
    from reca.models.openuni import OpenUniModel

    cfg = preset("openuni-tiny").model
    cfg = dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, num_layers=3, **vit))
    torch.manual_seed(0)
    return OpenUniModel(cfg, get_ops("torch"))


def test_drop_path_makes_the_visual_prompt_stochastic_in_train_mode_only():
    model = _openuni(drop_path_rate=0.5)
    layers = model.lmm.vision_tower.encoder.layer
    assert [layer.drop_path1.p for layer in layers] == [0.0, 0.25, 0.5] == [layer.dropout.p for layer in layers]
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.train()
    with torch.no_grad():
        a, b = model.encode_visual_prompt(x), model.encode_visual_prompt(x)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_visual_prompt(x), model.encode_visual_prompt(x))
    plain = _openuni(drop_path_rate=0.0).train()
    with torch.no_grad():
        assert torch.equal(plain.encode_visual_prompt(x), plain.encode_visual_prompt(x))
        eval_out = model.encode_visual_prompt(x)
        plain.eval()
        torch.testing.assert_close(eval_out, plain.encode_visual_prompt(x))  # p only acts in train mode


def test_drop_path_rate_comes_from_the_release_config(tmp_path):
    """drop_path_rate -1 (the real presets): the rate of DIR/internvl/config.json, as OpenUni's
    trainer applies it; reported at the start of the run."""
    from reca.engine.build import load_init_from
    from safetensors.torch import save_file
    from reca.models.openuni.weights import export_openuni, internvl_from_reca

    model = _openuni(drop_path_rate=-1.0)
    assert all(layer.drop_path1.p == 0.0 for layer in model.lmm.vision_tower.encoder.layer)
    export_openuni(model, tmp_path / "openuni.pth")
    (tmp_path / "internvl").mkdir()
    save_file({k: v.contiguous() for k, v in internvl_from_reca(model.lmm.state_dict()).items()},
              str(tmp_path / "internvl" / "model.safetensors"))
    (tmp_path / "internvl" / "config.json").write_text(json.dumps({"vision_config": {"drop_path_rate": 0.2}}))
    cfg = apply_overrides(preset("openuni-tiny"), [f"train.init_from={tmp_path}"])
    cfg = dataclasses.replace(cfg, model=model.cfg)
    report = load_init_from(model, cfg)
    assert [round(layer.drop_path1.p, 6) for layer in model.lmm.vision_tower.encoder.layer] == [0.0, 0.1, 0.2]
    assert "InternViT drop path 0.2 (internvl/config.json)" in report


# --- schedules -----------------------------------------------------------------------------------

def test_warmup_from_zero_follows_transformers_schedules():
    """BAGEL and Show-o use transformers' get_*_schedule_with_warmup: step / warmup, so the first
    update has lr 0; reca's default warm-up gives (step + 1) / warmup."""
    from reca.engine.optim import lr_factor

    for name in ("bagel-7b-mot", "showo-1.3b-256", "showo-1.3b-512"):
        o = preset(name).optim
        assert o.warmup_from_zero and o.warmup_steps == 1000, name
        assert [lr_factor(s, o, 10_000) for s in (0, 1, 500)] == [0.0, 0.001, 0.5]
        assert lr_factor(1000, o, 10_000) == 1.0
    plain = preset("harmon-1.5b").optim
    assert not plain.warmup_from_zero and lr_factor(0, plain, 12_500) == 1 / plain.warmup_steps


def test_showo_512_is_constant_after_warm_up_and_256_decays():
    """showo_reca_clip.yaml (512) decays over max_train_steps 1,000,000; flat over 10,000 steps."""
    assert preset("showo-1.3b-512").optim.schedule == "constant"
    assert preset("showo-1.3b-256").optim.schedule == "cosine"


# --- Show-o's prompts and views ------------------------------------------------------------------

def _showo(**kw):
    from reca.kernels import get_ops
    from reca.models.showo import ShowoModel

    cfg = dataclasses.replace(preset("showo-tiny").model, **kw)
    torch.manual_seed(0)
    return ShowoModel(cfg, get_ops("torch"))


def _builder(model, template=None, instructions=None, max_text=128):
    from reca.engine.sample import SampleBuilder, load_instructions

    return SampleBuilder(model.tokenizer, template or model.template, model.num_visual_tokens,
                         instructions or load_instructions(), fixed_prob=0.0, max_text_tokens=max_text)


def test_showo_recon_prompt_text_is_padded_to_128_ids():
    """t2i_clip_recon_prompt: <|mmu|><|soi|><|eoi|><bos> USER: \\n {instruction} ASSISTANT:<eos>,
    right-padded with [PAD] to 128 ids; the 576 CLIP tokens are spliced in after position 2."""
    from reca.engine.errors import UserError

    m = _showo(recon_text_tokens=128)
    b = _builder(m)
    assert b.length == m.num_visual_tokens + 128
    batch = b.build([0, 1, 2])
    text = batch.mask.sum(1) - m.num_visual_tokens
    assert (text <= 128).all() and (batch.input_ids[:, 2:2 + m.num_visual_tokens] == m.image_token_id).all()
    with pytest.raises(UserError, match="the template's 128 text tokens"):
        _builder(m, instructions=["word " * 200])


def test_showo_caption_answer_follows_llava_phi_conversation():
    """USER: \\n{q} ASSISTANT: {a}<|endoftext|>: the answer after a space, ended by the eos."""
    m = _showo()
    b = _builder(m, template=m.caption_template, max_text=32)
    _, ids, mask, _ = b.build_caption(m.tokenizer, ["a red bus", None], "What is it?", 16)
    want = m.tokenizer.encode(" a red bus") + [m.tokenizer.token_id("<|endoftext|>")]
    assert ids[0, :len(want)].tolist() == want and int(mask[0].sum()) == len(want) and not mask[1].any()
    assert m.caption_template.text.endswith("USER: \n{instruction} ASSISTANT:")


def test_showo_clip_view_is_the_generation_view_resized_without_antialias():
    """data.py:149 + train_recon_w_clip_vit.py:564: the Pillow-stretched generation image, then
    bilinear to 336 without antialias and without CLIP's mean/std."""
    import torch.nn.functional as F

    m = _showo(image_size=32, clip=dataclasses.replace(preset("showo-tiny").model.clip, image_size=16)).eval()
    assert m.views.und_size == m.views.gen_size == 32 and m.views.same_pixels()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        got = m.encode_visual_prompt(x)
        small = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
        want = m.mm_projector(m.clip(pixel_values=small).last_hidden_state[:, 1:])
    torch.testing.assert_close(got, want)


def test_showo_vq_variant_defaults_follow_train_recon():
    """train_recon.py:546-608: f"USER: \\n {instruction} ASSISTANT:", one instruction for the
    whole batch, the ids embedded inside the model (the table gets the recon gradient)."""
    vq = _showo(visual="vq", vq_input_size=16)
    assert "<|endoftext|>USER: \n {instruction} ASSISTANT:<|endoftext|>" in vq.template.text
    assert vq.template.instruction_per == "batch" and vq.recon_embed_grad is True
    assert _showo().recon_embed_grad is False and _showo(recon_embed_grad=True).recon_embed_grad is True
    batch = _builder(vq, max_text=64).build(list(range(6)))
    assert all(torch.equal(batch.input_ids[0], row) for row in batch.input_ids)
    clip = _builder(_showo(), max_text=64).build(list(range(6)))
    assert not all(torch.equal(clip.input_ids[0], row) for row in clip.input_ids)


# --- Harmon's ids ----------------------------------------------------------------------------------

def test_harmon_prompt_ids_are_the_official_whole_string_tokenisation():
    """text2image.py:473-485: INSTRUCTION.format(input="\\n" + prompt) (pooled) or
    "Generate an image." (fixed) tokenised whole, the image placed after the first three ids
    (<|im_start|>, user, the newline token): "user\\n\\n" for pooled prompts, "user\\n" for the
    fixed one. The same with reca's tokenizer: each ids list equals the whole string's."""
    from reca.engine.sample import SampleBuilder
    from reca.kernels import get_ops
    from reca.models.harmon import HarmonModel

    m = HarmonModel(preset("harmon-tiny").model, get_ops("torch"))
    tok, nv = m.tokenizer, 3
    instruction = "Describe every visual detail of this image."
    b = SampleBuilder(tok, m.template, nv, [instruction], fixed_prob=0.0, max_text_tokens=32)
    fmt = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
    for choice, text in ((0, "\n" + instruction), (-1, "Generate an image.")):
        whole = tok.encode(fmt.format(input=text))
        head = tok.encode("<|im_start|>user\n" + ("\n" if choice == 0 else ""))
        assert whole[:len(head)] == head  # the split lies on a token boundary
        official = whole[:len(head)] + [m.image_token_id] * nv + whole[len(head):]
        assert b.ids(choice) == official, choice


@pytest.mark.parametrize("name", ["janus-pro-1b", "janus-pro-7b"])
def test_janus_presets_follow_janus_pro_stage_three(name):
    """Janus-Pro's report, Table 2, stage III: AdamW lr 4e-5, betas (0.9, 0.95), weight decay 0,
    constant, no warm-up, clip 1.0; its generation data cropped (the short side to 384), never
    said to be flipped; CFG 5 at inference (generation_inference.py), so 10 % unconditional rows."""
    cfg = preset(name)
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.schedule, o.warmup_steps, o.clip_grad) == \
        (4e-5, (0.9, 0.95), 0.0, "constant", 0, 1.0)
    assert cfg.data.crop_scale == 1.0 and not cfg.data.hflip and cfg.mix.cycle == ("recon", "caption")
    m = cfg.model
    assert (m.cfg_dropout, m.guidance_scale, m.sample_temperature, m.vision.image_size) == (0.1, 5.0, 1.0, 384)
    assert cfg.data.batch_size * 8 == 128  # Janus-Pro's batch over 8 ranks
