"""Latent codecs (`reca.models.vae`): the exact patch codec, the LDM AutoencoderKL's behaviour on a
small config, and the checkpoint key layout and parameter counts of the FLUX and KL-16 presets
(built on the meta device: nothing is allocated). Fast: CPU only, no network, no downloads."""
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

try:
    from reca.models import vae
except Exception:  # the package may be mid-edit elsewhere; vae.py itself imports nothing from reca
    _spec = importlib.util.spec_from_file_location("reca_models_vae", Path(__file__).parents[1] / "models" / "vae.py")
    vae = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = vae  # dataclasses look their module up while being built
    _spec.loader.exec_module(vae)

AutoencoderKL, KLConfig, LatentCodec, PatchVAE = vae.AutoencoderKL, vae.KLConfig, vae.LatentCodec, vae.PatchVAE

# FLUX.1 ae.safetensors: 244 tensors, 83,819,683 parameters (the public file's totals).
FLUX_PARAMS, FLUX_TENSORS = 83_819_683, 244
# MAR / Harmon kl16.ckpt as built by MAR's models/vae.py (encoder attention at the 16 x 16 level,
# none in the decoder, quant convs): 312 tensors, 66,456,019 parameters. Without the two encoder
# attention blocks it would be 64,352,723.
KL16_PARAMS, KL16_TENSORS = 66_456_019, 312

KEY = re.compile(
    r"(?:(?:encoder|decoder)\.(?:conv_in|conv_out|norm_out"
    r"|mid\.(?:block_[12]\.(?:norm1|norm2|conv1|conv2|nin_shortcut)|attn_1\.(?:norm|q|k|v|proj_out))"
    r"|(?:down|up)\.\d+\.block\.\d+\.(?:norm1|norm2|conv1|conv2|nin_shortcut)"
    r"|(?:down|up)\.\d+\.attn\.\d+\.(?:norm|q|k|v|proj_out)"
    r"|down\.\d+\.downsample\.conv|up\.\d+\.upsample\.conv)"
    r"|quant_conv|post_quant_conv)\.(?:weight|bias)"
)


def small(**changes) -> KLConfig:
    cfg = KLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, use_quant_conv=False,
                   scale=1.0, shift=0.0, sample_posterior=False)
    return dataclasses.replace(cfg, **changes)


def built(cfg: KLConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


def image(b: int = 2, h: int = 24, w: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- PatchVAE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, 3])
def test_patch_round_trip_is_exact(p):
    x = torch.randn(2, 3, 6 * p, 5 * p, generator=torch.Generator().manual_seed(p)) * 7.3 + 0.1
    codec = PatchVAE(p)
    z = codec.encode(x)
    assert z.shape == (2, 3 * p * p, 6, 5) and codec.latent_channels == 3 * p * p and codec.downsample == p
    assert torch.equal(codec.decode(z), x)


def test_patch_layout_is_colour_then_row_then_column():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    z = PatchVAE(2).encode(x)
    for c, dy, dx, i, j in [(0, 0, 0, 0, 0), (1, 0, 1, 1, 2), (2, 1, 0, 1, 1), (2, 1, 1, 0, 2)]:
        assert torch.equal(z[:, c * 4 + dy * 2 + dx, i, j], x[:, c, 2 * i + dy, 2 * j + dx])


def test_patch_rejects_indivisible_sides():
    with pytest.raises(ValueError, match="divisible"):
        PatchVAE(2).encode(torch.zeros(1, 3, 5, 4))


def test_both_codecs_satisfy_the_protocol():
    assert isinstance(PatchVAE(2), LatentCodec)
    assert isinstance(built(small()), LatentCodec)


# --- AutoencoderKL on a small config -------------------------------------------------------------

@torch.no_grad()
def test_kl_shapes_at_non_square_sizes():
    model = built(small())
    assert model.downsample == 2 and model.latent_channels == 4
    z = model.encode(image())
    assert z.shape == (2, 4, 12, 20)
    assert model.decode(z).shape == (2, 3, 24, 40)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 25, 40))


@torch.no_grad()
def test_kl_quant_convs_change_the_latent_width():
    model = built(small(use_quant_conv=True, embed_dim=3))
    assert model.latent_channels == 3
    z = model.encode(image(1))
    assert z.shape == (1, 3, 12, 20) and model.decode(z).shape == (1, 3, 24, 40)


@torch.no_grad()
def test_posterior_mode_is_deterministic_and_the_mean():
    model, x = built(small()), image()
    a, b = model.encode(x), model.encode(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(a, model.moments(x)[0])


@torch.no_grad()
def test_sampled_posterior_follows_the_generator():
    model, x = built(small(sample_posterior=True)), image()
    draw = lambda seed: model.encode(x, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.allclose(draw(3), draw(4))
    mean, logvar = model.moments(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draw(3), mean + torch.exp(0.5 * logvar) * eps)


@torch.no_grad()
def test_scale_and_shift_are_applied_and_inverted():
    x = image()
    one = built(small(scale=1.0))
    two = AutoencoderKL(small(scale=2.0)).eval()
    two.load_state_dict(one.state_dict())
    z1, z2 = one.encode(x), two.encode(x)
    torch.testing.assert_close(z2, 2 * z1)
    torch.testing.assert_close(two.decode(z2), one.decode(z1))

    shifted = AutoencoderKL(small(scale=0.5, shift=0.25)).eval()
    shifted.load_state_dict(one.state_dict())
    zs = shifted.encode(x)
    torch.testing.assert_close(zs, 0.5 * (z1 - 0.25))
    torch.testing.assert_close(shifted.decode(zs), one.decode(z1))


def test_state_dict_round_trips_strictly_through_safetensors(tmp_path):
    cfg = small(use_quant_conv=True, embed_dim=4)
    src = built(cfg, seed=0)
    save_file(src.state_dict(), str(tmp_path / "vae.safetensors"))
    dst = built(cfg, seed=1)
    dst.load_state_dict(load_file(str(tmp_path / "vae.safetensors")), strict=True)
    with torch.no_grad():
        x = image(1)
        assert torch.equal(dst.encode(x), src.encode(x))
        assert torch.equal(dst.decode(src.encode(x)), src.decode(src.encode(x)))


# --- checkpoint layout of the presets (meta device: nothing allocated) -----------------------------

def meta_state(cfg: KLConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def test_flux_layout_and_parameter_count():
    state = meta_state(vae.flux_vae_config())
    assert all(KEY.fullmatch(k) for k in state), [k for k in state if not KEY.fullmatch(k)]
    assert len(state) == FLUX_TENSORS and sum(s.numel() for s in state.values()) == FLUX_PARAMS
    assert state["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert state["encoder.down.0.block.0.conv1.weight"] == (128, 128, 3, 3)
    assert state["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert state["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert state["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert state["encoder.conv_out.weight"] == (32, 512, 3, 3)  # mean and logvar
    assert state["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert state["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert state["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert state["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert state["decoder.conv_out.weight"] == (3, 128, 3, 3)
    for absent in ("encoder.down.3.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
                   "encoder.down.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.weight"):
        assert absent not in state
    assert not any(".attn." in k for k in state)  # FLUX has attention only in the mid blocks


def test_kl16_layout_and_parameter_count():
    state = meta_state(vae.kl16_config())
    assert all(KEY.fullmatch(k) for k in state), [k for k in state if not KEY.fullmatch(k)]
    assert len(state) == KL16_TENSORS and sum(s.numel() for s in state.values()) == KL16_PARAMS
    assert state["quant_conv.weight"] == (32, 32, 1, 1)
    assert state["post_quant_conv.weight"] == (16, 16, 1, 1)
    assert state["encoder.down.4.attn.1.proj_out.weight"] == (512, 512, 1, 1)
    assert state["decoder.up.4.upsample.conv.weight"] == (512, 512, 3, 3)
    assert not any(k.startswith("decoder.") and ".attn." in k for k in state)


# --- choosing a codec ------------------------------------------------------------------------------

def test_build_codec_from_config():
    codec = vae.build_codec(vae.VAEConfig())
    assert isinstance(codec, PatchVAE) and codec.patch == 2
    with torch.device("meta"):
        flux = vae.build_codec(vae.VAEConfig(kind="kl"))  # kl unset: FLUX.1's ae
        kl16 = vae.build_codec(vae.VAEConfig(kind="kl", kl=vae.kl16_config()))
    assert (flux.latent_channels, flux.downsample) == (16, 8)
    assert (kl16.latent_channels, kl16.downsample) == (16, 16)
    assert sum(p.numel() for p in flux.parameters()) == FLUX_PARAMS
    with pytest.raises(ValueError, match="unknown vae kind"):
        vae.build_codec(vae.VAEConfig(kind="vq"))
