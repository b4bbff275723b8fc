"""Checkpoints: atomic, checksummed, weights-only; every fault a user can meet is one line that
names the file, and a failed write keeps the previous checkpoint."""
import contextlib
import errno
import os
import subprocess

import pytest
import torch

from reca.engine.checkpoint import (CHECKPOINT, atomic_save, checkpoint_bytes, fingerprint_conflict,
                                    frozen_fingerprint, load_checkpoint, load_trainable, refuse_conflicts, restore,
                                    resume_conflicts, save_checkpoint)
from reca.engine.checkpoint import integrity
from reca.engine.config import RunConfig
from reca.engine.errors import UserError
from reca.engine.presets import preset


class Tiny(torch.nn.Module):
    """A frozen encoder (rebuilt from the seed) and a trainable head: what a checkpoint splits."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.enc = torch.nn.Linear(8, width)
        self.head = torch.nn.Linear(width, 4)
        self.enc.requires_grad_(False)


def _run(seed: int = 0, width: int = 16):
    torch.manual_seed(seed)
    model = Tiny(width)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(seed + 1)
    return model, opt, sched, gen


def _trained(run_dir, step=3, **kw):
    model, opt, sched, gen = _run(**kw)
    for _ in range(step):
        model.head(model.enc(torch.randn(2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    save_checkpoint(run_dir, step=step, model=model, optimizer=opt, scheduler=sched, data={"images": {"pos": 6}},
                    generator=gen, config=preset("tiny").to_dict(), frozen=frozen_fingerprint(model))
    return model, opt


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_round_trip_restores_weights_optimizer_config_and_fingerprint(tmp_path):
    model, opt = _trained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 3 and ckpt["data"] == {"images": {"pos": 6}}
    assert RunConfig.from_dict(ckpt["config"]) == preset("tiny")
    fresh, fopt, fsched, fgen = _run()
    assert fingerprint_conflict(ckpt["frozen"], frozen_fingerprint(fresh)) is None
    assert restore(ckpt, model=fresh, optimizer=fopt, scheduler=fsched, generator=fgen) == 3
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(fopt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_flipped_bytes_in_tensor_data_are_refused(tmp_path):
    model, _ = _trained(tmp_path, width=512)  # head.weight: 2048 float32 values, 8 KiB of tensor data
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    raw = model.head.weight.detach().numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "the tensor's bytes are stored verbatim in the archive"
    for i in range(at + 1000, at + 1064):  # 64 bytes in the middle of head.weight
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    # torch alone loads the damaged tensor without a word: this is what the checksum is for
    plain = torch.load(path, weights_only=True)
    assert not torch.equal(plain["model"]["head.weight"], model.head.weight)
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    _one_line(e, str(path), "damaged")


def test_a_flipped_byte_anywhere_is_refused(tmp_path):
    _trained(tmp_path)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit, wherever it falls (pickle, zip headers, tensors)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    _one_line(e, "damaged")


class _Boom:
    def __reduce__(self):  # unpickling this would create a file: a pickle that runs code
        return (open, (os.environ["RECA_TEST_MARKER"], "w"))


@pytest.mark.parametrize("fault", ["empty", "directory", "foreign", "cut-short", "pickle", "missing-key", "not-dict"])
def test_damaged_empty_or_foreign_files_are_one_line(tmp_path, monkeypatch, fault):
    path = tmp_path / CHECKPOINT
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("RECA_TEST_MARKER", str(marker))
    if fault == "empty":
        path.write_bytes(b"")
        needle = "empty"
    elif fault == "directory":
        path.mkdir()
        needle = "is a directory"
    elif fault == "foreign":  # another program's torch.save, a pickle with code in it included
        torch.save({"step": 1, "boom": _Boom()}, path)
        needle = "not a reca checkpoint"
    elif fault == "cut-short":
        _trained(tmp_path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        needle = "not a reca checkpoint"
    elif fault == "pickle":  # checksummed, but holding what the weights-only loader refuses
        atomic_save({"step": 1, "boom": _Boom()}, path)
        needle = "cannot be read as a checkpoint"
    elif fault == "missing-key":
        atomic_save({"step": 1, "model": {}}, path)
        needle = "lacks 'optimizer'"
    else:
        atomic_save([1, 2, 3], path)
        needle = "holds a list"
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    _one_line(e, str(path), needle)
    assert not marker.exists(), "no pickle may run code"


def test_missing_checkpoint_says_nothing_to_resume(tmp_path):
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    _one_line(e, "nothing to resume")


@pytest.mark.parametrize("fault", ["shape", "unknown", "frozen", "missing"])
def test_load_trainable_names_the_tensor_and_changes_nothing(tmp_path, fault):
    model, _, _, _ = _run(seed=1)
    state = {n: p.detach().clone() + 1 for n, p in model.named_parameters() if p.requires_grad}
    if fault == "shape":
        state["head.weight"] = torch.zeros(4, 32)
        needle = "head.weight has shape [4, 32], this model's is [4, 16]"
    elif fault == "unknown":
        state["vit.proj"] = torch.zeros(1)
        needle = "vit.proj, which this model does not have"
    elif fault == "frozen":
        state["enc.weight"] = torch.zeros(16, 8)
        needle = "enc.weight, which this model keeps frozen"
    else:
        del state["head.bias"]
        needle = "lacks 1 trainable tensor(s) of this model, e.g. head.bias"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError) as e:
        load_trainable(model, state, source=str(tmp_path / CHECKPOINT))
    _one_line(e, needle, str(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "nothing copied"


def test_checkpoint_of_another_shape_through_restore(tmp_path):
    _trained(tmp_path, width=16)
    model, opt, sched, gen = _run(width=24)
    with pytest.raises(UserError) as e:
        restore(load_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched, generator=gen,
                source=str(tmp_path / CHECKPOINT))
    _one_line(e, "head.weight has shape [4, 16], this model's is [4, 24]")


def _tmp_files(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


class _FailingFile:
    """A file whose writes fail with `error` once `limit` bytes went through."""

    def __init__(self, f, limit, error):
        self.f, self.limit, self.error, self.n = f, limit, error, 0

    def write(self, data):
        self.n += len(data)
        if self.n > self.limit:
            raise self.error
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("error,needle", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (KeyboardInterrupt(), None),  # a second Ctrl-C during the write
], ids=["enospc", "quota", "ctrl-c"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error, needle):
    """Simulated on any file system (the real full one is below, where a tmpfs can be mounted)."""
    model, _ = _trained(tmp_path)
    before = (tmp_path / CHECKPOINT).read_bytes()
    real = os.fdopen
    monkeypatch.setattr(integrity.os, "fdopen", lambda fd, mode: _FailingFile(real(fd, mode), 2000, error))
    with pytest.raises(type(error) if needle is None else UserError) as e:
        _trained(tmp_path, step=5)
    if needle:
        _one_line(e, str(tmp_path / CHECKPOINT), needle, "previous one is kept")
    assert _tmp_files(tmp_path) == []
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert load_checkpoint(tmp_path)["step"] == 3


def test_ctrl_c_between_writes_is_still_an_interrupt(tmp_path, monkeypatch):
    """A second Ctrl-C that lands in torch.save's own code, after a buffer was written, leaves
    torch's zip writer a wrong position, whose RuntimeError would mask the interrupt: it is
    re-raised as the KeyboardInterrupt, the previous file kept and no temp file left."""
    atomic_save({"step": 1}, tmp_path / CHECKPOINT)
    before = (tmp_path / CHECKPOINT).read_bytes()
    real = integrity._HashingWriter.write
    calls = []

    def write_then_interrupt(self, data):
        n = real(self, data)
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as the signal handler would, after the write returned
        return n

    monkeypatch.setattr(integrity._HashingWriter, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "w": torch.randn(1000)}, tmp_path / CHECKPOINT)
    assert len(calls) == 3
    assert _tmp_files(tmp_path) == []
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_permission_denied_names_it(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(integrity.tempfile, "mkstemp", denied)
    with pytest.raises(UserError) as e:
        atomic_save({"step": 1}, tmp_path / CHECKPOINT)
    _one_line(e, "permission denied", "no earlier one exists")


@contextlib.contextmanager
def tiny_fs(path, size: str):
    """A tmpfs of `size` mounted on `path` (root only), unmounted after; skips where it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_file_system_keeps_the_previous_checkpoint(tmp_path):
    with tiny_fs(tmp_path / "fs", "64k") as run:
        _trained(run, width=16)  # a few KiB: fits
        before = (run / CHECKPOINT).read_bytes()
        with pytest.raises(UserError) as e:
            _trained(run, step=4, width=2048)  # head + AdamW moments: ~100 KiB, does not
        _one_line(e, "no space left on device", "previous one is kept")
        assert _tmp_files(run) == []
        assert (run / CHECKPOINT).read_bytes() == before
        assert load_checkpoint(run)["step"] == 3


def test_read_only_file_system_keeps_the_previous_checkpoint(tmp_path):
    with tiny_fs(tmp_path / "fs", "1m") as run:
        _trained(run)
        subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
        with pytest.raises(UserError) as e:
            _trained(run, step=4)
        _one_line(e, "read-only file system", "previous one is kept")
        assert load_checkpoint(run)["step"] == 3


def test_checkpoint_bytes_bounds_the_file(tmp_path):
    model, _ = _trained(tmp_path, width=256)
    params = [p for p in model.parameters() if p.requires_grad]
    size = (tmp_path / CHECKPOINT).stat().st_size
    assert checkpoint_bytes(params) == 3 * 4 * (256 * 4 + 4)
    assert 0.9 * checkpoint_bytes(params) < size < checkpoint_bytes(params) + 64 * 1024


# --- the resume guard -----------------------------------------------------------------------

def test_resume_conflicts_name_what_changed():
    saved = preset("tiny").to_dict()
    same = RunConfig.from_dict(saved).to_dict()  # tuples -> lists -> tuples: not a change
    assert resume_conflicts(saved, same) == []
    new = preset("tiny").to_dict()
    new["train"]["seed"] = 1
    new["optim"]["lr"] = 5e-5  # the schedule may change on resume
    new["train"]["steps"] = 10_000
    assert resume_conflicts(saved, new) == ["train.seed changed from 0 to 1"]
    new["model"]["llm"]["num_layers"] += 1
    new["mix"]["cycle"] = ["recon", "caption"]
    new["data"]["batch_size"] = 3
    assert resume_conflicts(saved, new) == [
        "data.batch_size changed from 8 to 3",
        'mix.cycle changed from ["recon"] to ["recon", "caption"]',
        f"model.llm.num_layers changed from {saved['model']['llm']['num_layers']} to "
        f"{saved['model']['llm']['num_layers'] + 1}",
        "train.seed changed from 0 to 1",
    ]
    with pytest.raises(UserError) as e:
        refuse_conflicts(saved, new, "runs/x")
    _one_line(e, "cannot resume runs/x: data.batch_size changed from 8 to 3", "and 1 more")


def test_resume_conflicts_across_families():
    lines = resume_conflicts(preset("tiny").to_dict(), preset("harmon-tiny").to_dict())
    assert any(line.startswith("model.family changed from") for line in lines), lines


def test_frozen_fingerprint_sees_seed_bits_and_order():
    a, b = _run(seed=0)[0], _run(seed=0)[0]
    assert frozen_fingerprint(a) == frozen_fingerprint(b)
    assert set(frozen_fingerprint(a)) == {"enc.weight", "enc.bias"}  # trainable ones are the checkpoint's
    with torch.no_grad():
        b.head.weight.add_(1)  # training moves trainable weights: no effect
    assert frozen_fingerprint(a) == frozen_fingerprint(b)
    other = _run(seed=1)[0]
    assert "frozen parameter enc.bias differs" in fingerprint_conflict(frozen_fingerprint(a), frozen_fingerprint(other))
    with torch.no_grad():  # one bit of one value
        b.enc.weight.view(-1).view(torch.int32)[37] ^= 1
    assert "enc.weight" in fingerprint_conflict(frozen_fingerprint(a), frozen_fingerprint(b))
    c = _run(seed=0)[0]
    with torch.no_grad():  # two values swapped: the plain sum cannot see it, the weighted one does
        w = c.enc.weight.view(-1)
        w[[3, 90]] = w[[90, 3]].clone()
    assert "enc.weight" in fingerprint_conflict(frozen_fingerprint(a), frozen_fingerprint(c))
    half = _run(seed=0)[0].to(torch.bfloat16)
    assert fingerprint_conflict(frozen_fingerprint(a), frozen_fingerprint(half)) is not None
    assert fingerprint_conflict({}, frozen_fingerprint(a)) is None  # a checkpoint that stored none


def test_frozen_fingerprint_chunks_agree(monkeypatch):
    """The reduction runs in chunks to bound device memory; chunk boundaries change nothing."""
    from reca.engine.checkpoint import guard

    model = _run(width=300)[0]
    whole = frozen_fingerprint(model)
    monkeypatch.setattr(guard, "_CHUNK", 7)
    assert frozen_fingerprint(model) == whole


def test_a_tied_tensor_is_saved_once_and_loads_under_either_name():
    """Tied weights (an LM head sharing the embedding table) are one tensor: listed once, under
    the first name; a checkpoint holding both names (a step-N/ folder written before) loads when
    they are equal, is refused in one line when they differ, and either name alone fills both."""
    from torch import nn

    from reca.engine.checkpoint import load_trainable, tied_names, trainable_state

    m = nn.Module()
    m.embed, m.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    m.head.weight = m.embed.weight
    assert tied_names(m) == {"head.weight": "embed.weight"} and list(trainable_state(m)) == ["embed.weight"]
    w = torch.randn(5, 3)
    load_trainable(m, {"embed.weight": w, "head.weight": w.clone()})
    assert torch.equal(m.embed.weight, w) and m.head.weight is m.embed.weight
    load_trainable(m, {"head.weight": 2 * w})
    assert torch.equal(m.embed.weight, 2 * w)
    with pytest.raises(UserError, match="two different tensors for embed.weight and head.weight"):
        load_trainable(m, {"embed.weight": w, "head.weight": w + 1})
    assert torch.equal(m.embed.weight, 2 * w)  # left as it was
