"""The command line: user errors are one line on stderr and exit status 2, never a traceback."""
import json
import os
import subprocess
import sys

import pytest

from reca.engine.config import apply_overrides
from reca.engine.errors import UserError
from reca.engine.presets import PRESETS, preset


def reca(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "reca.engine", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("reca: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["train", "--set", "nonsense"], "key=value"),
        (["train", "--set", "optim.lr=fast"], "optim.lr expects float"),
        (["train", "--data", "/definitely/not/here"], "/definitely/not/here"),
        (["train", "--device", "cuda"], "no CUDA GPU"),
        (["train", "--resume", "/no/such/run"], "nothing to resume"),
        (["train", "--prompts", "/no/prompts.txt", "--steps", "1"], "prompts file not found"),
        (["info", "--preset", "nope"], "unknown preset"),
    ],
    ids=["preset", "key", "set-syntax", "value-type", "missing-data", "no-gpu", "resume", "prompts", "info-preset"],
)
def test_user_errors_are_one_line(args, needle, tmp_path):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    _one_line_error(reca(*args, "--out", str(tmp_path / "r")) if args[0] == "train" and "--resume" not in args
                    else reca(*args), needle)


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _one_line_error(reca("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")), "empty")


def test_info_prints_counts_without_allocating():
    proc = reca("info", "--preset", "flow-7b", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    mods = report["modules"]
    # Qwen2-7B body (no LM head): 7,070,619,136; SigLIP-so400m/14 minus its last layer and head;
    # FLUX ae: 83,819,683 (the public file's count).
    assert mods["llm"]["parameters"] == 7_070_619_136
    assert mods["codec"]["parameters"] == 83_819_683 and not mods["codec"]["trainable"]
    assert not mods["vit"]["trainable"] and mods["llm"]["trainable"]
    assert report["parameters"] == sum(m["parameters"] for m in mods.values())


def test_info_tiny_is_a_few_million():
    """The printed table: module rows sum to the total, which --json agrees with; the LLM row is
    the Qwen2 body of the preset's shape counted by hand."""
    proc = reca("info", "--preset", "tiny")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(reca("info", "--preset", "tiny", "--json").stdout)
    rows = {}
    for line in proc.stdout.splitlines():
        cells = line.split()
        if len(cells) >= 2 and cells[0] in {*report["modules"], "total", "trainable"}:
            rows[cells[0]] = int(cells[1].replace(",", ""))
    total, trainable = rows.pop("total"), rows.pop("trainable")
    assert set(rows) == set(report["modules"]) and total == sum(rows.values()) == report["parameters"]
    assert trainable == total  # tiny trains everything
    assert 2_000_000 < total < 5_000_000
    d, kv, mlp, vocab, layers = 192, 2 * 48, 512, 1024, 4  # 4 heads of 48, 2 KV heads
    per_layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * mlp + 2 * d  # q, k, v (biased), o, MLP, 2 norms
    assert rows["llm"] == vocab * d + layers * per_layer + d


def test_overrides_are_typed():
    cfg = apply_overrides(preset("tiny"), ["optim.lr=2e-5", "optim.betas=0.8,0.9", "data.hflip=false",
                                           "train.steps=1_000", "model.llm.num_layers=3"])
    assert cfg.optim.lr == 2e-5 and cfg.optim.betas == (0.8, 0.9) and cfg.data.hflip is False
    assert cfg.train.steps == 1000 and cfg.model.llm.num_layers == 3
    with pytest.raises(UserError):
        apply_overrides(preset("tiny"), ["train.steps=1.5"])
    with pytest.raises(UserError):
        apply_overrides(preset("tiny"), ["model.llm=3"])


def test_every_preset_round_trips_through_json():
    from reca.engine.config import RunConfig

    for name, fn in PRESETS.items():
        cfg = fn()
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg, name


def test_an_existing_run_is_never_silently_replaced(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"precious")
    _one_line_error(reca("train", "--out", str(run), "--steps", "1"), "--resume")
    assert (run / "checkpoint.pt").read_bytes() == b"precious"


def test_recipe_with_captioning_needs_captioned_images(tmp_path):
    _one_line_error(reca("train", "--preset", "harmon-tiny", "--set", "mix.cycle=recon,caption",
                         "--out", str(tmp_path / "r")), "mix.caption_source")
