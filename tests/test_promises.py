"""What reca promises a run (README, "What reca promises"), through the CLI in subprocesses on the
tiny preset: a stop request (SIGINT/SIGTERM to the whole process group, as a terminal, a
container stop or a batch scheduler sends it) ends in a checkpoint of the last finished step, a
true message and exit status 130/143, also while a preview is drawn and while data workers run;
kill -9 (also mid-write) loses nothing a resume needs; what would go on silently wrong is
refused with one line and exit status 2, changing nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reca.engine.checkpoint import load_checkpoint
from reca.engine.metrics import read_metrics

# Small and fast: two images a step, two-image previews of two sampling steps, one log row a step.
FAST = ["--preset", "tiny", "--data", "demo", "--quiet", "--set", "output.tensorboard=false",
        "--set", "data.batch_size=2", "--set", "output.preview_images=2", "--set", "output.preview_steps=2",
        "--set", "output.log_every=1"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's reca


def start(*args: str) -> subprocess.Popen:
    """`python -m reca.engine train ARGS` in its own process group (as a job's would be)."""
    return subprocess.Popen([sys.executable, "-m", "reca.engine", "train", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def reca(*args: str, timeout: float = 240) -> tuple[int, str, str]:
    return finish(start(*args), timeout)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.stderr.read()}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out")
        time.sleep(0.05)


def steps_logged(run: Path) -> int:
    try:
        rows = read_metrics(run)
    except Exception:  # a line being written
        return 0
    return rows[-1]["step"] if rows else 0


def one_line_error(rc: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("reca: error: "), (rc, err)
    for w in words:
        assert w in lines[0], (w, lines[0])


def stopped_at(err: str, name: str) -> int:
    """The step named by the stop message (which must be there, once)."""
    found = re.findall(rf"reca: interrupted \({name}\) after step (\d+), its checkpoint written", err)
    assert len(found) == 1, err
    assert "Traceback" not in err, err
    return int(found[0])


def previews(run: Path) -> set[int]:
    return {int(p.stem.removeprefix("recon_step")) for p in run.glob("recon_step*.png")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_previews_are_drawn_checkpoints_the_last_step(tmp_path, sig):
    """A preview every step (most of a step's time): the stop lands in one or between. The
    checkpoint holds the step the message names, the metrics end there, no preview comes after
    it, and the run resumes to its end."""
    run = tmp_path / "run"
    args = [*FAST, "--out", str(run), "--steps", "300", "--set", "output.preview_every=1",
            "--set", "output.preview_steps=8", "--set", "output.ckpt_every=1000"]
    proc = start(*args)
    wait_for(proc, lambda: len(previews(run)) >= 3)
    os.killpg(proc.pid, sig)
    rc, _, err = finish(proc)
    assert rc == 128 + sig, (rc, err)
    n = stopped_at(err, sig.name)
    assert load_checkpoint(run)["step"] == n
    assert [r["step"] for r in read_metrics(run)] == list(range(1, n + 1))
    drawn = previews(run)
    assert set(range(1, n)) <= drawn <= set(range(1, n + 1)), (n, sorted(drawn))
    rc, _, err = reca("--resume", str(run), "--steps", str(n + 2))
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(run)] == list(range(1, n + 3))


def test_sigterm_to_the_group_with_data_workers_and_a_second_process_refused(tmp_path):
    """Workers ignore the group's SIGTERM (the main process owns the stop): the run checkpoints
    and exits 143. Meanwhile a second process on the same directory is refused at once, naming
    the first one's pid, and changes nothing."""
    run = tmp_path / "run"
    proc = start(*FAST, "--out", str(run), "--steps", "300", "--set", "data.num_workers=2",
                 "--set", "output.ckpt_every=1000", "--set", "output.preview_every=0")
    wait_for(proc, lambda: steps_logged(run) >= 2)
    config = (run / "config.json").read_bytes()
    rc, _, err = reca(*FAST, "--out", str(run), "--steps", "5", "--overwrite")
    one_line_error(rc, err, "in use by another reca process", f"pid {proc.pid}")
    assert (run / "config.json").read_bytes() == config and proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc == 143, err
    assert "DataLoader" not in err
    n = stopped_at(err, "SIGTERM")
    assert load_checkpoint(run)["step"] == n == steps_logged(run)


def test_a_second_ctrl_c_aborts_in_one_line_and_keeps_the_checkpoint(tmp_path):
    """The first Ctrl-C starts the last step's checkpoint write; a second one right after cuts
    it (or the step): "interrupted", exit 130, and a checkpoint that loads, with no temp file."""
    run = tmp_path / "run"
    proc = start(*FAST, "--out", str(run), "--steps", "300", "--set", "output.ckpt_every=1",
                 "--set", "output.preview_every=0")
    wait_for(proc, lambda: steps_logged(run) >= 3)
    logged = steps_logged(run)  # step n's row is written just before step n's checkpoint
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130, err
    lines = err.strip().splitlines()
    assert lines[-1] == "reca: interrupted" or lines[-1].startswith("reca: interrupted (SIGINT) after step"), err
    assert "Traceback" not in err, err
    assert load_checkpoint(run)["step"] >= logged - 1  # at worst the write of step `logged` was cut
    assert not list(run.glob(".*.tmp"))


def test_kill_9_mid_write_then_resume(tmp_path):
    """kill -9 with a checkpoint written every step (a write is often in progress): the resume
    removes the killed write's temp file, starts from the checkpoint and reaches the end."""
    run = tmp_path / "run"
    proc = start(*FAST, "--out", str(run), "--steps", "300", "--set", "output.ckpt_every=1",
                 "--set", "output.preview_every=0")
    wait_for(proc, lambda: steps_logged(run) >= 4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    orphan = run / ".checkpoint.pt.killed.tmp"  # what a kill mid-write leaves (planted: the kill may miss one)
    orphan.write_bytes(b"half a checkpoint")
    step = load_checkpoint(run)["step"]
    assert step >= 3
    rc, _, err = reca("--resume", str(run), "--steps", str(step + 2))
    assert rc == 0, err
    assert not list(run.glob(".*.tmp"))
    assert load_checkpoint(run)["step"] == step + 2
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 3))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """A finished 2-step run; tests work on copies of it."""
    run = tmp_path_factory.mktemp("promises") / "run"
    rc, _, err = reca(*FAST, "--out", str(run), "--steps", "2", "--set", "output.preview_every=0")
    assert rc == 0, err
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_refused_resumes_change_nothing(done_run, tmp_path):
    """A changed seed, and --steps below the run's step: one line, exit 2, config.json and the
    checkpoint as they were."""
    run = copy_of(done_run, tmp_path)
    before = {p: (run / p).read_bytes() for p in ("config.json", "checkpoint.pt", "metrics.jsonl")}
    rc, _, err = reca("--resume", str(run), "--steps", "4", "--set", "train.seed=1")
    one_line_error(rc, err, "train.seed changed from 0 to 1")
    rc, _, err = reca("--resume", str(run), "--steps", "1")
    one_line_error(rc, err, "at step 2", "train.steps=1")
    assert {p: (run / p).read_bytes() for p in before} == before


def test_flipped_bytes_are_refused(done_run, tmp_path):
    run = copy_of(done_run, tmp_path)
    ckpt = run / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    ckpt.write_bytes(bytes(data))
    rc, _, err = reca("--resume", str(run), "--steps", "4")
    one_line_error(rc, err, "damaged", str(ckpt))


def test_a_torn_metrics_line_is_skipped_on_resume(done_run, tmp_path):
    run = copy_of(done_run, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-write
    rc, _, err = reca("--resume", str(run), "--steps", "3")
    assert rc == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line parses
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # (the preview's alignment row is its own line)
    assert {r["step"] for r in rows} == {1, 2, 3}


def test_overwrite_killed_before_its_first_checkpoint_never_continues_the_old_weights(done_run, tmp_path):
    """The old run is moved aside before the new one writes: after kill -9 there is nothing to
    resume (not the old weights under the new config), and the moved run is whole."""
    run = copy_of(done_run, tmp_path)
    proc = start(*FAST, "--out", str(run), "--steps", "300", "--overwrite", "--set", "optim.lr=3e-4",
                 "--set", "output.ckpt_every=1000", "--set", "output.preview_every=0")
    wait_for(proc, lambda: any(run.glob("replaced-*")) and steps_logged(run) >= 1)  # the new run's rows
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoint.pt").exists()
    rc, _, err = reca("--resume", str(run))
    one_line_error(rc, err, "nothing to resume")
    (moved,) = run.glob("replaced-*")
    assert load_checkpoint(moved)["step"] == 2
    assert json.loads((moved / "config.json").read_text())["optim"]["lr"] != 3e-4
