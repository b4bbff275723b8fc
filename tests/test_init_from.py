"""No checkpoint tensor is dropped silently: through `reca train --init-from`, for every family,
a file holding a tensor the model has no place for, or lacking one, is refused in one line that
names the tensor and the count (exit 2, nothing of the run written); a whole file trains, and
`reca info --init-from` reports what each file supplied without reading the tensors."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from reca.engine.build import seeded_model
from reca.engine.cli import main
from reca.engine.config import apply_overrides
from reca.engine.presets import preset
from reca.kernels import get_ops

# family preset -> (the file of its release layout, what writes it, a parameter the file must hold)
LAYOUTS = {
    "tiny": ("llm/model.safetensors", lambda m, p: save_file(m.llm.state_dict(), str(p)),
             "layers.0.mlp.up_proj.weight"),
    "harmon-tiny": ("harmon.pth", lambda m, p: m.export(str(p)), "mar.encoder_blocks.0.attn.qkv.weight"),
    "bagel-tiny": ("ema.safetensors", lambda m, p: m.export(str(p)), "llm2vae.weight"),
    "openuni-tiny": ("openuni.pth", lambda m, p: m.export(str(p)), "connector.layers.0.mlp.fc1.weight"),
    "showo-tiny": ("model.safetensors", lambda m, p: m.export(str(p)), "showo.model.layers.0.self_attn.q_layernorm.weight"),
    "janus-tiny": ("model.safetensors", lambda m, p: m.export(str(p)), "model.language_model.layers.0.mlp.up_proj.weight"),
}
PREFIX = {"tiny": "llm.", "janus-tiny": "janus."}  # the file's names inside the model (tiny's file is llm/)


def _write(name: str, root, change=None):
    file, write, _ = LAYOUTS[name]
    cfg = preset(name)
    model = seeded_model(cfg, get_ops("torch"), torch.device("cpu"))
    path = root / file
    path.parent.mkdir(parents=True, exist_ok=True)
    write(model, path)
    if change is not None:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        change(state)
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
    return root


def _refused(capsys, tmp_path, weights, name, *needles):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", name, "--init-from", str(weights), "--out", str(run), "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("reca: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not run.exists() or not any(p.name in ("config.json", "checkpoint.pt") for p in run.rglob("*"))


def test_layout_parameters_exist():
    """The parameters named above are the families' own (so the 'lacks' cases test what they say)."""
    for name, (_, _, key) in LAYOUTS.items():
        model = seeded_model(preset(name), get_ops("torch"), torch.device("cpu"))
        names = {n for n, _ in model.named_parameters()}
        assert PREFIX.get(name, "") + key in names, (name, key)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_tensor_without_a_place_is_refused(capsys, tmp_path, name):
    weights = _write(name, tmp_path / "w", lambda s: s.update({"adapter.extra.weight": torch.zeros(3, 3)}))
    _refused(capsys, tmp_path, weights, name, "1 tensor this model has no place for", "adapter.extra.weight")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_missing_tensor_is_refused(capsys, tmp_path, name):
    key = LAYOUTS[name][2]
    weights = _write(name, tmp_path / "w", lambda s: s.pop(key))
    _refused(capsys, tmp_path, weights, name, "lacks 1 parameter", key)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_whole_file_is_reported_by_info_and_loads(capsys, tmp_path, name):
    weights = _write(name, tmp_path / "w")
    main(["info", "--preset", name, "--init-from", str(weights)])
    out = capsys.readouterr().out
    file = LAYOUTS[name][0].split("/")[0] + ("/" if "/" in LAYOUTS[name][0] else "")
    assert f"--init-from {weights}: {file} " in out and " tensors" in out, out
    if name == "bagel-tiny":  # its two fixed sin-cos tables, on the family's list of tensors not used
        assert "ema.safetensors" in out and "(2 not used)" in out, out
    cfg = apply_overrides(preset(name), [f"train.init_from={weights}"])
    model = seeded_model(cfg, get_ops("torch"), torch.device("cpu"))
    assert model.init_from_report.startswith(f"--init-from {weights}: {file} ")


# --- malformed and hostile files: one line each, nothing run ---------------------------------------

class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch EXECUTED",))


def _hostile(d):
    torch.save({"x": _Evil()}, d / "harmon.pth")


def _bytes(name, data):
    return lambda d: (d / name).write_bytes(data)


def _cut_safetensors(d):
    save_file({"a": torch.zeros(1000)}, str(d / "ema.safetensors"))
    data = (d / "ema.safetensors").read_bytes()
    (d / "ema.safetensors").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name,write,needle", [
    ("harmon-tiny", _hostile, "unsupported GLOBAL"),
    ("harmon-tiny", _bytes("harmon.pth", bytes(range(256)) * 2), "not a plain tensor checkpoint"),
    ("bagel-tiny", _bytes("ema.safetensors", b"\xff" * 16 + b"{bad"), "not a readable safetensors file"),
    ("bagel-tiny", _bytes("ema.safetensors", b""), "not a readable safetensors file"),
    ("bagel-tiny", _cut_safetensors, "not a readable safetensors file"),
    ("tiny", lambda d: (d / "llm").mkdir() or (d / "llm" / "model.safetensors").write_bytes(
        b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!"), "not a readable safetensors file"),
], ids=["hostile-pickle", "garbage-pth", "bad-header", "empty", "cut", "bad-json-header"])
def test_a_malformed_or_hostile_file_is_one_line(capsys, tmp_path, monkeypatch, name, write, needle):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "w"
    weights.mkdir()
    write(weights)
    _refused(capsys, tmp_path, weights, name, needle)
    assert not (tmp_path / "EXECUTED").exists()


def test_a_preset_function_that_raises_or_wants_arguments_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mypresets.py").write_text("def broken():\n    raise KeyError('no such thing')\n\n"
                                            "def needs(size):\n    return None\n")
    for spec, needle in (("mypresets:broken", "broken() raised KeyError"), ("mypresets:needs", "must take no arguments")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--preset", spec, "--out", str(tmp_path / "run"), "--steps", "1"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_a_prompt_that_is_not_utf8_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--preset", "tiny", "--init-from", str(tmp_path), "--prompt", "caf\udce9", "--out", str(tmp_path)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and lines == ["reca: error: --prompt is not valid UTF-8 text (check the terminal's encoding)"]
