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
