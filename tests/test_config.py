"""Configuration is validated when it is built: every enumeration and range is one UserError line
naming the field, from `--set`, from a saved config.json, and from Python callers; the CLI exits
with status 2 before anything is built or trained."""
import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest

from reca.engine import config as config_module
from reca.engine.config import (DataConfig, OptimConfig, RunConfig, apply_overrides, check_batch_memory,
                                load_config)
from reca.engine.errors import UserError
from reca.engine.presets import PRESETS, preset
from reca.engine.sample import load_instructions
from reca.models.adapter import ViewSpec
from reca.models.harmon.diffhead import DiffHeadShape
from reca.models.harmon.mar import MARShape
from reca.models.flow import SiglipShape
from reca.models.layers import Qwen2Shape
from reca.models.vae import KLConfig, VAEConfig


def _refused(sets, needle, name="tiny"):
    with pytest.raises(UserError) as err:
        apply_overrides(preset(name), sets)
    message = str(err.value)
    assert needle in message, message
    assert "\n" not in message
    return message


# --- enumerations -------------------------------------------------------------------------------

@pytest.mark.parametrize("key,bad", [
    ("optim.schedule", "cosin"),
    ("data.decoder", "jpeg"),
    ("kernels.backend", "cuda"),
    ("train.mode", "turbo"),
    ("train.precision", "fp16"),
    ("train.attention", "flash2"),
    ("model.vae.kind", "vq"),
])
def test_enumeration_refuses_unknown_value(key, bad):
    message = _refused([f"{key}={bad}"], f"{key} must be one of")
    assert repr(bad) in message


def _literal_fields():
    """(dotted key, allowed values) of every Literal field of the sections and the tiny model."""
    cfg = preset("tiny")
    out = []
    for section in dataclasses.fields(RunConfig):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        stack = [(section.name, value)]
        while stack:
            where, obj = stack.pop()
            for name, tp in typing.get_type_hints(type(obj)).items():
                if typing.get_origin(tp) is typing.Literal:
                    out.append((f"{where}.{name}", typing.get_args(tp)))
                elif dataclasses.is_dataclass(getattr(obj, name, None)):
                    stack.append((f"{where}.{name}", getattr(obj, name)))
    return out


def test_every_enumeration_value_is_accepted():
    fields = dict(_literal_fields())
    # the enumerations the issue names are Literal types (not free strings checked later)
    assert {"optim.schedule", "data.decoder", "kernels.backend", "train.mode", "train.precision",
            "train.attention", "model.vae.kind"} <= set(fields)
    for key, allowed in fields.items():
        for value in allowed:
            cfg = apply_overrides(preset("tiny"), [f"{key}={value}"])
            section, *rest = key.split(".")
            obj = getattr(cfg, section)
            for part in rest:
                obj = getattr(obj, part)
            assert obj == value, key


@pytest.mark.parametrize("key,bad,good", [
    ("train.device", "gpu", "cuda:1"),
    ("train.device", "cuda:x", "cpu"),
    ("data.decode_device", "cuda0", "cuda:0"),
    ("mix.cycle", "recon,recon,capton", "recon,caption"),
    ("mix.cycle", "", "recon"),
])
def test_device_forms_and_objectives(key, bad, good):
    _refused([f"{key}={bad}"], f"{key} must be")
    apply_overrides(preset("tiny"), [f"{key}={good}"])  # the form is checked here, the device at build


def test_objective_names_live_in_one_place(monkeypatch):
    _refused(["mix.cycle=recon,describe"], "mix.cycle")
    monkeypatch.setattr(config_module, "OBJECTIVES", (*config_module.OBJECTIVES, "describe"))
    assert apply_overrides(preset("tiny"), ["mix.cycle=recon,describe"]).mix.cycle == ("recon", "describe")


def test_python_callers_are_checked_too():
    with pytest.raises(UserError, match="optim.schedule must be one of cosine, constant, got 'cosin'"):
        OptimConfig(schedule="cosin")
    with pytest.raises(UserError, match="data.crop_scale"):
        DataConfig(crop_scale=2.0)
    with pytest.raises(UserError, match="optim.lr"):
        dataclasses.replace(preset("tiny").optim, lr=float("inf"))


# --- ranges -------------------------------------------------------------------------------------

RANGES = [
    # key, refused values, accepted edge values
    ("optim.lr", ["inf", "nan", "0", "-1e-4"], ["1e-9"]),
    ("optim.eps", ["0", "inf"], ["1e-15"]),
    ("optim.min_lr_ratio", ["-0.1", "1.5", "nan"], ["0", "1"]),
    ("optim.clip_grad", ["-1", "inf"], ["0"]),
    ("optim.weight_decay", ["-0.01", "inf"], ["0"]),
    ("optim.betas", ["0.9,1.0", "-0.1,0.9"], ["0,0.999"]),
    ("optim.grad_accum", ["0", "-2"], ["1"]),
    ("optim.warmup_steps", ["-1"], ["0", "100000"]),  # warm-up past train.steps is allowed
    ("output.log_every", ["0", "-5"], ["1"]),
    ("output.ckpt_every", ["0", "-1"], ["1"]),
    ("output.preview_every", ["-1"], ["0"]),
    ("output.preview_steps", ["0"], ["1"]),
    ("output.preview_images", ["-1"], ["0"]),
    ("data.crop_scale", ["2", "0", "-0.5", "nan"], ["1", "0.01"]),
    ("data.und_downscale", ["0", "1.5"], ["1"]),
    ("data.batch_size", ["0"], ["1"]),
    ("data.num_workers", ["-1"], ["0"]),
    ("data.decode_threads", ["0"], ["1"]),
    ("data.shuffle_window", ["-1"], ["0"]),
    ("sample.fixed_prob", ["-0.1", "1.1"], ["0", "1"]),
    ("sample.max_text_tokens", ["0"], ["1"]),
    ("mix.max_answer_tokens", ["0"], ["1"]),
    ("train.steps", ["0", "-10"], ["1"]),
    ("train.threads", ["-1"], ["0"]),
    ("train.checkpoint_every", ["-1"], ["0", "1"]),
    ("train.ema", ["-0.1", "1", "1.5", "nan"], ["0", "0.9999"]),
]


@pytest.mark.parametrize("key,bad,good", RANGES, ids=[r[0] for r in RANGES])
def test_range(key, bad, good):
    for value in bad:
        _refused([f"{key}={value}"], f"{key} must be")
    for value in good:
        apply_overrides(preset("tiny"), [f"{key}={value}"])


def test_non_numbers_and_infinite_counts_are_type_errors():
    _refused(["train.steps=inf"], "train.steps expects int")
    _refused(["optim.lr=fast"], "optim.lr expects float")


def test_cuda_graph_on_cpu_is_refused_in_custom_mode():
    _refused(["train.cuda_graph=true", "train.device=cpu"], "train.cuda_graph needs CUDA")
    # fast and reference modes decide cuda_graph themselves from the device
    apply_overrides(preset("tiny"), ["train.cuda_graph=true", "train.device=cpu", "train.mode=fast"])


def test_nvjpeg_on_cpu_is_refused():
    _refused(["data.decoder=nvjpeg", "data.decode_device=cpu"], "data.decoder=nvjpeg")


# --- model shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,sets,needle", [
    ("tiny", ["model.llm.num_heads=5"], "model.llm: num_heads 5 must divide hidden_size 192"),
    ("tiny", ["model.llm.num_kv_heads=3"], "model.llm: num_kv_heads 3 must divide num_heads 4"),
    ("tiny", ["model.llm.num_heads=64"], "model.llm: head width"),  # 192 / 64 = 3: odd, no rotary pairs
    ("tiny", ["model.llm.rope_theta=inf"], "model.llm: rope_theta"),
    ("tiny", ["model.llm.num_layers=0"], "model.llm: num_layers must be >= 1"),
    ("tiny", ["model.vit.patch_size=5"], "model.vit: image_size 32 must be divisible by patch_size 5"),
    ("tiny", ["model.vit.num_heads=5"], "model.vit: num_heads 5 must divide hidden_size 192"),
    ("tiny", ["model.vae.patch=0"], "model.vae: patch must be >= 1"),
    ("flow-7b", ["model.vae.kl.ch_mult=()"], "model.vae.kl: ch_mult"),
    ("flow-7b", ["model.vae.kl.encoder_attn_levels=4"], "model.vae.kl: encoder_attn_levels"),
    ("harmon-tiny", ["model.mar.buffer_size=0"], "model.mar: buffer_size must be >= 1"),
    ("harmon-tiny", ["model.mar.num_heads=3"], "model.mar: num_heads 3 must divide width 64"),
    ("harmon-tiny", ["model.mar.dropout=1"], "model.mar: dropout"),
    ("harmon-tiny", ["model.head.freq_dim=7"], "model.head: freq_dim must be even"),
    ("harmon-tiny", ["model.head.sample_steps=2000"], "model.head: sample_steps 2000 must be <= num_steps 1000"),
    ("harmon-tiny", ["model.head.batch_mul=0"], "model.head: batch_mul must be >= 1"),
])
def test_model_shape(name, sets, needle):
    _refused(sets, needle, name=name)


def test_shapes_raise_value_error_for_python_callers():
    for make in (lambda: Qwen2Shape(hidden_size=100, num_heads=3), lambda: SiglipShape(image_size=30, patch_size=8),
                 lambda: MARShape(buffer_size=0), lambda: DiffHeadShape(freq_dim=3), lambda: VAEConfig(patch=0),
                 lambda: KLConfig(ch_mult=())):
        with pytest.raises(ValueError):
            make()


def test_every_preset_builds_and_round_trips():
    for name, fn in PRESETS.items():
        cfg = fn()
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg, name


# --- saved configs ------------------------------------------------------------------------------

def test_saved_config_loads_and_refuses_hand_edits(tmp_path):
    path = tmp_path / "config.json"
    cfg = apply_overrides(preset("harmon-tiny"), ["optim.lr=3e-4"])
    path.write_text(cfg.to_json())
    assert load_config(path) == cfg
    assert load_config(tmp_path) == cfg  # a run directory names its config.json

    d = json.loads(cfg.to_json())
    path.write_text(cfg.to_json()[:-20])
    with pytest.raises(UserError, match=r"config.json is not valid JSON: .* at line \d+, column \d+"):
        load_config(path)
    for edit, needle in [(("optim", "lrr", 1.0), "unknown config key 'optim.lrr'"),
                         (("optim", "schedule", "cosin"), "optim.schedule must be one of"),
                         (("data", "crop_scale", 2), "data.crop_scale must be in (0, 1]"),
                         (("model", "mar", 3), "model.mar expects a table of fields"),
                         (("optim", "betas", 0.9), "optim.betas expects a list"),
                         (("train", "steps", float("inf")), "train.steps expects int")]:
        bad = json.loads(json.dumps(d))
        section, key, value = edit
        bad[section][key] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError) as err:
            load_config(path)
        assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), str(err.value)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="a config is a table of sections"):
        load_config(path)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.json")


# --- host memory of a batch ---------------------------------------------------------------------

VIEWS = ViewSpec(und_size=16, und_mean=(0.48, 0.46, 0.41), und_std=(0.27, 0.26, 0.28), gen_size=32)


def test_batch_memory_estimate_and_refusal():
    per_image = 3 * 4 * (16 * 16 + 32 * 32)  # both views, float32
    data = DataConfig(batch_size=4, num_workers=0)
    assert check_batch_memory(data, VIEWS, 2, available=10**12) == (2 + 1) * 4 * per_image
    # 3 workers each prefetch max(2, ceil(2 * 4 / 3)) = 3 samples
    need = (2 + 1) * 4 * per_image + 9 * per_image
    data = DataConfig(batch_size=4, num_workers=3)
    assert check_batch_memory(data, VIEWS, 2, available=need) == need
    with pytest.raises(UserError, match=r"data.batch_size 4 needs about .* GiB of host memory .* is available"):
        check_batch_memory(data, VIEWS, 2, available=need - 1)
    # Harmon's views are one tensor: half the bytes of two equal views
    same = ViewSpec(und_size=32, und_mean=(0.5,) * 3, und_std=(0.5,) * 3, gen_size=32)
    assert check_batch_memory(DataConfig(batch_size=4), same, 1, available=10**12) == 2 * 4 * 3 * 4 * 32 * 32


def test_batch_memory_against_this_machine(monkeypatch):
    if config_module._mem_available() is None:
        pytest.skip("no /proc/meminfo")
    huge = DataConfig(batch_size=10**9)
    with pytest.raises(UserError, match="lower data.batch_size"):
        check_batch_memory(huge, VIEWS, 1)
    assert check_batch_memory(DataConfig(batch_size=8), VIEWS, 1) > 0
    monkeypatch.setattr(config_module, "_mem_available", lambda: None)  # unreadable: no check
    assert check_batch_memory(huge, VIEWS, 1) == 0


# --- prompts files ------------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (b"draw it\x00again\n", "binary"),
    (b"\x00\x00\x00\x00", "binary"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not UTF-8"),
    (b"  \n\t\n\x01\x02\n", "no instructions"),
    (b"", "no instructions"),
])
def test_prompts_file_refused(tmp_path, content, needle):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        load_instructions(str(f))


def test_prompts_file_text_kept(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffRedraw this image.\n\n  Décris l'image.  \n\x01\n".encode("utf-8"))
    assert load_instructions(str(f)) == ["Redraw this image.", "Décris l'image."]


# --- presets from any module --------------------------------------------------------------------

MODULE = """
from reca.engine.presets import tiny
import dataclasses


def small():
    cfg = tiny()
    return dataclasses.replace(cfg, preset="", optim=dataclasses.replace(cfg.optim, lr=5e-4))


def named():
    return dataclasses.replace(tiny(), preset="mine")


def not_a_config():
    return {"optim": {}}


def bad_shape():
    from reca.models.layers import Qwen2Shape
    return Qwen2Shape(hidden_size=100, num_heads=3)

VALUE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "reca_user_presets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "reca_user_presets"
    sys.modules.pop("reca_user_presets", None)


def test_preset_from_a_module(user_module):
    cfg = preset(f"{user_module}:small")
    assert cfg.optim.lr == 5e-4 and cfg.preset == f"{user_module}:small"
    assert preset(f"{user_module}:named").preset == "mine"


@pytest.mark.parametrize("spec,needle", [
    ("no_such_module_xyz:fn", "cannot import no_such_module_xyz"),
    ("{m}:missing", "has no function 'missing'"),
    ("{m}:VALUE", "has no function 'VALUE'"),
    ("{m}:not_a_config", "not_a_config() returned dict, not a RunConfig"),
    ("{m}:bad_shape", "num_heads 3 must divide hidden_size 100"),
    ("{m}:", "expected module:function"),
])
def test_preset_from_a_module_errors(user_module, spec, needle):
    with pytest.raises(UserError) as err:
        preset(spec.format(m=user_module))
    assert needle in str(err.value), str(err.value)


def test_cli_config_and_set_on_top(tmp_path, monkeypatch):
    """`reca train --config RUN/config.json`: the saved fields, then the flags and --set on top."""
    from reca.engine import cli
    import reca.engine.train as train_module

    saved = apply_overrides(preset("harmon-tiny"), ["optim.lr=3e-4", "mix.cycle=recon", f"output.dir={tmp_path / 'a'}"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(saved.to_json())
    got = []
    monkeypatch.setattr(train_module, "train", lambda cfg, **kw: got.append((cfg, kw)))
    cli.main(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"),
              "--steps", "7", "--set", "optim.grad_accum=2"])
    (cfg, kw), = got
    assert kw["resume"] is False
    assert cfg == apply_overrides(saved, [f"output.dir={tmp_path / 'b'}", "train.steps=7", "optim.grad_accum=2"])


# --- through the command line -------------------------------------------------------------------

def reca(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "reca.engine", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _one_line_exit_2(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("reca: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


CLI_CASES = [(key, value) for key, bad, _ in RANGES for value in bad] + [
    ("optim.schedule", "cosin"), ("train.mode", "turbo"), ("kernels.backend", "cuda"), ("train.precision", "fp16"),
    ("train.attention", "flash2"), ("data.decoder", "jpeg"), ("train.device", "gpu"), ("mix.cycle", "recon,capton"),
    ("model.llm.num_heads", "5"), ("model.vit.patch_size", "5"), ("model.vae.kind", "vq")]


@pytest.mark.parametrize("key,value", CLI_CASES, ids=[f"{k}={v}" for k, v in CLI_CASES])
def test_cli_main_refuses_before_training(tmp_path, capsys, key, value):
    """`reca train --set KEY=BAD` for every enumeration and range: exit 2, one line, nothing
    written (in-process through `cli.main`, as the entry point runs it; subprocesses below)."""
    from reca.engine import cli

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--steps", "1", "--out", str(out), "--set", f"{key}={value}"])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"reca: error: ") and key.split(".")[-1] in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("sets,needle", [
    (["--set", "optim.schedule=cosin"], "optim.schedule must be one of cosine, constant, got 'cosin'"),
    (["--set", "optim.lr=inf"], "optim.lr must be finite and > 0"),
], ids=["schedule", "lr"])
def test_cli_refuses_before_training(tmp_path, sets, needle):
    out = tmp_path / "run"
    _one_line_exit_2(reca("train", "--steps", "1", "--out", str(out), *sets), needle)
    assert not out.exists()  # nothing built, nothing written


def test_cli_refuses_binary_prompts(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\x00" * 64)
    out = tmp_path / "run"
    _one_line_exit_2(reca("train", "--steps", "1", "--out", str(out), "--prompts", str(tmp_path / "p.txt")), "binary")
    assert not out.exists()


def test_cli_config_errors(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    cfg = json.loads(preset("tiny").to_json())
    cfg["optim"]["schedule"] = "cosin"
    (run / "config.json").write_text(json.dumps(cfg))
    _one_line_exit_2(reca("train", "--config", str(run / "config.json"), "--out", str(tmp_path / "new")),
                     "optim.schedule must be one of")
    (run / "config.json").write_text("{not json")
    _one_line_exit_2(reca("train", "--resume", str(run)), "not valid JSON")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("args,needle", [
    (["--config", "RUN", "--preset", "tiny"], "leave out --preset and --resume"),
    (["--config", "RUN", "--resume", "RUN"], "leave out --preset and --resume"),
    (["--config", "RUN/missing.json"], "config file not found"),
    (["--preset", "no_such_module_xyz:f"], "cannot import no_such_module_xyz"),
])
def test_cli_main_config_and_preset_flags(tmp_path, capsys, args, needle):
    from reca.engine import cli

    (tmp_path / "config.json").write_text(preset("tiny").to_json())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *[a.replace("RUN", str(tmp_path)) for a in args]])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines


def test_cli_preset_from_a_module(tmp_path):
    (tmp_path / "my_presets.py").write_text(MODULE)
    proc = reca("info", "--preset", "my_presets:small", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["preset"] == "my_presets:small" and report["family"] == "flow"
