"""A torchrun job's RUN/step-N/ folders: every file checksummed (`checkpoint.sums`), a damaged one
refused at resume, `reca sample RUN` and `reca export RUN` in one line naming the file and the
newest whole folder; a folder that does not read back as written is never put in place and
rotates nothing out; NaN or inf weights are never resumed, sampled or exported; a full disk
is refused at start for the torchrun layout, and a save it cuts short leaves the earlier
folders as they were and the resume working (2 gloo processes, through the CLI).

Run by torchrun (`__main__` below), this file is also the worker of the full-disk test: the CLI
with the disk filled up just before a save."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, EVERY = 4, 2
SETS = ["data.batch_size=2", "output.log_every=1", "optim.schedule=constant", "train.device=cpu",
        f"output.ckpt_every={EVERY}", "output.tensorboard=false", "output.preview_images=0"]
FLAGS = [f"--set={s}" for s in SETS]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "--max-restarts", "0", *args]


def run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run (but its lock) -> its sha256: what a refusal must leave unchanged."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def refused(argv: list[str], capsys) -> str:
    """`reca ARGV` in this process -> its one line (exit status 2)."""
    from reca.engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """`torchrun reca train` of tiny under fsdp, 2 ranks, 4 steps: RUN/step-2/ and step-4/, each
    with both ranks' shards."""
    root = tmp_path_factory.mktemp("base") / "run"
    run(torchrun("-m", "reca.engine", "train", "--quiet", "--preset", "tiny", "--out", str(root),
                 "--steps", str(STEPS), *FLAGS))
    return root


def test_every_file_of_a_step_folder_is_checksummed(base):
    """SHA256SUMS lists each rank's shards and .metadata (what `sha256sum -c` reads), extra.pt
    holds SHA256SUMS's own digest, and extra.pt carries its checksum trailer."""
    from reca.engine.checkpoint import verified_load
    from reca.engine.checkpoint.sums import SUMS, check_folder

    folder = base / f"step-{STEPS}"
    listed = dict(reversed(line.split("  ")) for line in (folder / SUMS).read_text().splitlines())
    assert sorted(listed) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert verified_load(folder / "extra.pt")["sums"] == hashlib.sha256((folder / SUMS).read_bytes()).hexdigest()
    assert check_folder(folder)["step"] == STEPS
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--strict", "-c", SUMS], cwd=folder, capture_output=True).returncode == 0


def test_the_digests_are_taken_as_written_and_a_file_that_reads_back_otherwise_is_caught(tmp_path):
    """`sums.writer` hashes what DCP hands each file (no digest left to a second pass);
    `read_back` compares the file on disk against it and names a file that differs."""
    import torch.distributed.checkpoint as dcp

    from reca.engine.checkpoint import sums

    w = sums.writer(tmp_path)
    dcp.save({"w": torch.arange(1000.0), "b": torch.ones(3)}, storage_writer=w, no_dist=True)
    assert sorted(w.fs.written) == [".metadata", "__0_0.distcp"] and all(w.fs.written.values())
    assert sums.read_back(tmp_path, 0, w) == {n: sums.file_sha256(tmp_path / n) for n in w.fs.written}
    flip(tmp_path / "__0_0.distcp")
    with pytest.raises(sums.Fault) as e:
        sums.read_back(tmp_path, 0, w)
    assert e.value.name == "__0_0.distcp" and "does not read back as it was written" in e.value.why


KINDS = {"shard": "__1_0.distcp", "metadata": ".metadata", "extra": "extra.pt", "sums": "SHA256SUMS"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_is_refused_at_resume_sample_and_export(base, tmp_path, capsys, kind):
    """One byte flipped in any kind of file of the newest step-N/ (a shard, .metadata, extra.pt,
    SHA256SUMS): `reca train --resume`, `reca sample RUN` and `reca export RUN` each refuse in one
    line naming the file and the newest whole folder, before DCP reads anything; nothing is
    written or deleted (before: the resume trained on what it read, and rotated out the good
    folders)."""
    name = KINDS[kind]
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    flip(run_dir / f"step-{STEPS}" / name, at=10 if kind == "sums" else None)  # inside a hex digest
    before = snapshot(run_dir)
    want = (f"step-{STEPS}/{name} is damaged", f"the newest whole folder is step-{EVERY}: move step-{STEPS} out of "
            f"{run_dir}")
    line = refused(["train", "--quiet", "--resume", str(run_dir), "--steps", str(STEPS + EVERY)], capsys)
    assert line.startswith(f"reca: error: cannot resume {run_dir}: ") and all(w in line for w in want), line
    line = refused(["sample", str(run_dir), "--prompt", "a red bus", "--out", str(tmp_path / "s"), "--steps", "2"],
                   capsys)
    assert f"cannot read the weights of {run_dir}" in line and all(w in line for w in want), line
    line = refused(["export", str(run_dir), "--to", str(tmp_path / "x")], capsys)
    assert all(w in line for w in want), line
    assert snapshot(run_dir) == before and not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_a_folder_written_before_checksums_is_still_read(base, tmp_path, capsys):
    """A step folder of an earlier reca (no SHA256SUMS, none recorded in its extra.pt) is
    exported as before, with one line saying that its files are read unverified."""
    from reca.engine.checkpoint import atomic_save, verified_load
    from reca.engine.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    folder = run_dir / f"step-{STEPS}"
    extra = verified_load(folder / "extra.pt")
    del extra["sums"]
    atomic_save(extra, folder / "extra.pt")
    (folder / "SHA256SUMS").unlink()
    main(["export", str(run_dir), "--to", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert err == f"reca: {folder} holds no SHA256SUMS (written by reca before step folders were checksummed): its " \
                  "files are read unverified"
    assert (tmp_path / "x" / "model.safetensors").is_file()


def test_a_damaged_shard_is_refused_by_every_rank_under_torchrun(base, tmp_path):
    """`torchrun ... --resume` of a run whose newest folder has rank 1's shard damaged: the
    ranks share the checking, and both end with the same line; the run is left as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    flip(run_dir / f"step-{STEPS}" / "__1_0.distcp")
    before = snapshot(run_dir)
    proc = run(torchrun("-m", "reca.engine", "train", "--quiet", "--resume", str(run_dir), "--steps", "6"), ok=False)
    line = (f"reca: error: cannot resume {run_dir}: step-{STEPS}/__1_0.distcp is damaged: its bytes no longer match "
            f"the sha256 written with them (a disk or copy fault); the newest whole folder is step-{EVERY}: move "
            f"step-{STEPS} out of {run_dir} to use it")
    assert line in proc.stderr, proc.stderr[-3000:]  # (each rank raised it: none is left in a collective)
    assert "loss" not in proc.stdout and snapshot(run_dir) == before


def test_a_new_folder_that_does_not_read_back_rotates_nothing_out(base, tmp_path, capsys, monkeypatch):
    """A save whose files do not read back as written (the disk returns other bytes: simulated
    by flipping one between DCP's write and the read-back) is one line; its temporary folder
    goes, and step-2 and step-4, the folder this job resumed from and verified, stay as they
    were (before: the newest folder was never read back, and rotation deleted the older ones)."""
    from reca.engine.checkpoint import sums

    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    before = snapshot(run_dir)
    real = sums.read_back

    def damaged_on_disk(folder, rank, w):
        flip(folder / f"__{rank}_0.distcp")
        return real(folder, rank, w)

    monkeypatch.setattr(sums, "read_back", damaged_on_disk)
    line = refused(["train", "--quiet", "--resume", str(run_dir), "--steps", str(STEPS + EVERY)], capsys)
    assert (f"cannot write step-{STEPS + EVERY} of {run_dir}: __0_0.distcp does not read back as it was written" in line
            and f"step-{EVERY}, step-{STEPS} are kept as they were" in line), line
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".step", "step"))) == \
        [f"step-{EVERY}", f"step-{STEPS}"]
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.startswith("step-")} == \
        {k: v for k, v in before.items() if k.startswith("step-")}


def test_nonfinite_weights_are_never_resumed_sampled_or_exported(base, tmp_path, capsys, monkeypatch):
    """A step-N/ folder whose checksums are right but which holds a NaN weight (here: one step
    of a resume with one weight set to NaN; the step is skipped as non-finite and the weight
    saved as it is) is refused by a resume, `reca sample RUN` and `reca export RUN`, each in one
    line naming the tensor (before: a resume's first loss was nan, sample and export wrote the
    weights without a word). One-process runs: the same for RUN/checkpoint.pt."""
    import reca.engine.train as train_module
    from reca.engine.checkpoint import atomic_save, verified_load
    from reca.engine.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    real = train_module.next_batches
    poisoned = {}

    def poison_then_batches(c):
        if not poisoned:
            name, p = next((n, p) for n, p in c.model.named_parameters() if p.requires_grad)
            with torch.no_grad():
                (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("nan")
            poisoned["name"] = name
        return real(c)

    monkeypatch.setattr(train_module, "next_batches", poison_then_batches)
    main(["train", "--quiet", "--resume", str(run_dir), "--steps", str(STEPS + 1)])
    monkeypatch.undo()
    capsys.readouterr()
    name, folder = poisoned["name"], run_dir / f"step-{STEPS + 1}"
    assert folder.is_dir() and rows(run_dir)[-1]["nonfinite"] == 1
    line = refused(["train", "--quiet", "--resume", str(run_dir), "--steps", str(STEPS + 2)], capsys)
    assert (f"cannot resume {run_dir}: step-{STEPS + 1}: tensor model.{name} holds NaN or inf values" in line
            and f"move step-{STEPS + 1} out of {run_dir} to resume from step-{STEPS}" in line), line
    for argv in (["sample", str(run_dir), "--prompt", "a red bus", "--out", str(tmp_path / "s"), "--steps", "2"],
                 ["export", str(run_dir), "--to", str(tmp_path / "x")]):
        assert f"{folder}: tensor {name} holds NaN or inf values" in refused(argv, capsys)
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()

    one = tmp_path / "one"
    main(["train", "--quiet", "--preset", "tiny", "--out", str(one), "--steps", "1", *FLAGS])
    ckpt = verified_load(one / "checkpoint.pt")
    ckpt["model"][name][0] = float("inf")
    atomic_save(ckpt, one / "checkpoint.pt")
    want = f"{one / 'checkpoint.pt'}: tensor {name} holds NaN or inf values"
    for argv in (["sample", str(one), "--prompt", "a red bus", "--out", str(tmp_path / "s"), "--steps", "2"],
                 ["export", str(one), "--to", str(tmp_path / "x")],
                 ["train", "--quiet", "--resume", str(one), "--steps", "2"]):
        assert want in refused(argv, capsys)
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


# --- a full disk under torchrun -----------------------------------------------------------

@contextlib.contextmanager
def tiny_fs(path: Path, size: str):
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


def fill(fs: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on `fs`."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, shutil.disk_usage(fs).free - leave))
    return filler


def test_a_full_disk_under_torchrun(tmp_path):
    """On a 160 MiB tmpfs (tiny's step folder: about 42 MB): (1) with room for two folders but
    not three, a new run is refused at start in one line (keeping 2 needs room for 3 during a
    save); (2) the disk filled just before step 6's save: that save is one line ("no space left
    on device"), its temporary folder is removed, step-2 and step-4 stay whole; (3) with room
    again, `--resume` continues from step-4 with the losses the cut run logged (before: no
    check at start, 7 tracebacks and a half .step-N.tmp that kept the disk full)."""
    with tiny_fs(tmp_path / "fs", "160m") as fs:
        run_dir, size = fs / "run", 42 * 2**20
        cmd = torchrun("-m", "reca.engine", "train", "--quiet", "--preset", "tiny", "--out", str(run_dir),
                       "--steps", "6", *FLAGS)
        filler = fill(fs, int(2.5 * size))
        proc = run(cmd, ok=False)
        assert "a save with distributed.keep_checkpoints=2 (3 step-N/ folders at once" in proc.stderr, \
            proc.stderr[-3000:]
        assert f"reca: error: run directory {run_dir} has 0.10 GiB free" in proc.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        filler.unlink()

        proc = run(torchrun(__file__, str(fs), *cmd[cmd.index("train"):]), ok=False)
        line = (f"reca: error: cannot write step-6 of {run_dir}: no space left on device writing __")
        assert line in proc.stderr and f"its temporary folder .step-6.tmp is removed, step-2, step-4 are " \
            f"kept as they were; continue with: reca train --resume {run_dir}" in proc.stderr, proc.stderr[-3000:]
        assert sorted(p.name for p in run_dir.iterdir() if "step" in p.name) == ["step-2", "step-4"]
        from reca.engine.checkpoint.sums import check_folder

        assert [check_folder(run_dir / f"step-{k}")["step"] for k in (2, 4)] == [2, 4]
        cut = rows(run_dir)
        assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
        (fs / "filler").unlink()

        run(torchrun("-m", "reca.engine", "train", "--quiet", "--resume", str(run_dir)))
        done = rows(run_dir)
        assert [r["step"] for r in done] == [1, 2, 3, 4, 5, 6]
        assert [r["loss"] for r in done] == pytest.approx([r["loss"] for r in cut], rel=1e-6)
        assert sorted(p.name for p in run_dir.iterdir() if "step" in p.name) == ["step-4", "step-6"]


if __name__ == "__main__":  # under torchrun: FS CLI-ARGS, the CLI with FS filled before step 6's save
    import reca.engine.train as train_module
    from reca.engine.cli import main

    fs, real, calls = Path(sys.argv[1]), train_module.next_batches, []

    def fill_before_the_last_step(c):
        calls.append(1)
        if len(calls) == 6 and int(os.environ["RANK"]) == 0:
            fill(fs, 1 << 20)  # room for metrics.jsonl's lines, none for a step folder
        return real(c)

    train_module.next_batches = fill_before_the_last_step
    main(sys.argv[2:])
