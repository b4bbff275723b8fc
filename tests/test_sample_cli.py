"""`reca sample` and `reca export` through the command line, for every family on its tiny preset:
PNGs of the family's generation size from a text prompt and from an image's visual prompt, the
export in the file the family's own loader reads (checked by loading it back with `--init-from`:
the same image, bit for bit, as the run's weights give), and bad input as one line, exit 2.

One run per family, trained one step in this process (module-scoped). Every command under test
runs in a subprocess, as a user runs it; they start as soon as their run exists, two at a time
(each is one thread: importing torch and transformers is most of its time)."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import reca
from reca.engine.config import apply_overrides

FAMILIES = {"flow": "tiny", "harmon": "harmon-tiny", "bagel": "bagel-tiny", "showo": "showo-tiny",
            "openuni": "openuni-tiny"}
# the file each family's loader reads back (engine/generate.py EXPORT_FILES)
EXPORTED = {"flow": "model.safetensors", "harmon": "harmon.safetensors", "bagel": "model.safetensors",
            "showo": "model.safetensors", "openuni": "openuni.safetensors"}
# OpenUni's export adds the .pth its trainer's pretrained_pth loads (the loader reads the pair once)
EXPORTED_TOO = {"openuni": ["openuni.pth"]}
# bagel-tiny trains an EMA (train.ema 0.999): its export adds BAGEL's ema.safetensors
EXPORTED_EMA = {"bagel": "ema.safetensors"}
STEPS = 2  # sampling steps: the images' size and determinism do not depend on how many


def reca_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "reca.engine", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line.strip()]


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reca: error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """An image file of another size than the models see (the sampler resizes it as previews do)."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def _export_then_load(family: str, run, photo, out):
    """`reca export RUN --to OUT/export`, then `reca sample --preset P --init-from OUT/export --image PHOTO`."""
    exported = reca_cli("export", run, "--to", out / "export")
    if family in EXPORTED_EMA and (out / "export" / EXPORTED_EMA[family]).exists():
        # BAGEL's loader prefers ema.safetensors (its release starts model and EMA from it): set
        # it aside, so that the round trip below reads the trained weights
        (out / "export" / EXPORTED_EMA[family]).rename(out / "ema.safetensors")
    loaded = reca_cli("sample", "--preset", FAMILIES[family], "--init-from", out / "export", "--image", photo,
                      "--steps", STEPS, "--out", out / "loaded")
    return exported, loaded


@pytest.fixture(scope="module")
def families(tmp_path_factory, photo):
    """family -> its run directory, generation size, the photo's image from the run's weights and
    from the untrained preset (both generated in this process), and the running CLI commands.
    One optimizer step of each tiny preset, at a learning rate that moves the weights visibly."""
    from reca.engine.generate import load_model, sample

    out = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for family, name in FAMILIES.items():
            run = tmp_path_factory.mktemp(family)
            cfg = apply_overrides(reca.preset(name), [
                f"output.dir={run}", "train.steps=1", "data.batch_size=2", "output.preview_images=0",
                "output.tensorboard=false", "train.device=cpu", "optim.warmup_steps=0", "optim.lr=1e-2"])
            reca.train(cfg, quiet=True)
            text = pool.submit(reca_cli, "sample", run, "--prompt", "a red bus", "--num", 2, "--steps", STEPS,
                               "--out", run / "text")
            exported = pool.submit(_export_then_load, family, run, photo, run)
            cfg, model = load_model(run=str(run), device="cpu")
            [trained] = sample(model, cfg, out=str(run / "expected"), images=(str(photo),), steps=STEPS)
            fresh_cfg, fresh = load_model(preset=name, device="cpu")
            [untrained] = sample(fresh, fresh_cfg, out=str(run / "untrained"), images=(str(photo),), steps=STEPS)
            out[family] = dict(run=run, size=model.views.gen_size, trained=_pixels(trained),
                               untrained=_pixels(untrained), text=text, exported=exported)
        return {family: {**v, "text": v["text"].result(), "exported": v["exported"].result()}
                for family, v in out.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_from_text_prompt(family, families):
    f = families[family]
    files = _ok(f["text"])
    assert [os.path.basename(p) for p in files] == ["text_00.png", "text_01.png"]
    images = [_pixels(p) for p in files]
    assert all(im.shape == (f["size"], f["size"], 3) for im in images)
    assert not np.array_equal(images[0], images[1])  # each image its own noise


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_back_and_samples_from_a_visual_prompt(family, families):
    """`reca export` writes the file the family's own loader reads; `reca sample --preset P
    --init-from DIR --image FILE` loads it into the preset and generates from the photo's visual
    prompt the pixels the run's own weights give (the frozen parts rebuild from the seed)."""
    f = families[family]
    exported, loaded = f["exported"]
    want = [EXPORTED[family], *EXPORTED_TOO.get(family, [])] + ([EXPORTED_EMA[family]] if family in EXPORTED_EMA else [])
    assert _ok(exported) == [str(f["run"] / "export" / name) for name in want]
    files = _ok(loaded)
    assert [os.path.basename(p) for p in files] == ["photo.png"]
    assert f["trained"].shape == (f["size"], f["size"], 3)
    assert not np.array_equal(f["trained"], f["untrained"])  # the step changed the image: equality means something
    np.testing.assert_array_equal(_pixels(files[0]), f["trained"])


def test_bad_input_is_one_line(families, tmp_path):
    run = families["flow"]["run"]
    _one_line_error(reca_cli("sample", tmp_path / "no-run", "--prompt", "x", "--out", tmp_path / "o"),
                    "not a reca run")
    _one_line_error(reca_cli("sample", run, "--out", tmp_path / "o"), "--prompt")
    _one_line_error(reca_cli("sample", "--preset", "tiny", "--prompt", "x", "--out", tmp_path / "o"), "--init-from")
    _one_line_error(reca_cli("sample", run, "--image", tmp_path / "missing.png", "--out", tmp_path / "o"),
                    "missing.png")
    _one_line_error(reca_cli("export", tmp_path / "no-run", "--to", tmp_path / "e"), "not a reca run")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()  # nothing written
