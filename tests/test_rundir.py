"""The run directory: writable at start or one line, one process at a time, leftovers of a
killed write removed, an earlier run moved aside by --overwrite, metrics that survive a torn line."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from reca.engine.checkpoint import CHECKPOINT, atomic_save, load_checkpoint
from reca.engine.errors import UserError
from reca.engine.metrics import MetricsWriter, read_metrics
from reca.engine.rundir import (LOCK, RunLock, check_free_space, check_run_dir, clean_orphans, read_run_config,
                                replace_run)


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


# --- writable at start ----------------------------------------------------------------------

def test_check_run_dir_creates_and_probes(tmp_path):
    run = check_run_dir(tmp_path / "a" / "b")
    assert run.is_dir() and list(run.iterdir()) == []  # the probe file is gone


def test_out_that_is_a_file_or_lies_under_one(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError) as e:
        check_run_dir(tmp_path / "f")
    _one_line(e, str(tmp_path / "f"), "is a file, not a directory")
    with pytest.raises(UserError) as e:
        check_run_dir(tmp_path / "f" / "run" / "deeper")
    _one_line(e, f"lies under {tmp_path / 'f'}, which is a file")


@pytest.mark.parametrize("where", ["read-only-dir", "untraversable-parent"])
def test_permission_denied_at_start(where):
    """A real EACCES: as root, a forked child drops to uid nobody; elsewhere the test runs as is."""
    base = Path(tempfile.mkdtemp(prefix="reca-perm-"))  # not under pytest's 0o700 tmp: nobody must reach it
    os.chmod(base, 0o755 if where == "read-only-dir" else 0o700)
    (base / "locked").mkdir(mode=0o555)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the message through the pipe, never return into pytest
        os.close(r)
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            check_run_dir(base / "locked" / "run")
            msg = "no error"
        except UserError as e:
            msg = str(e)
        except BaseException as e:
            msg = f"unexpected {e!r}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    shutil.rmtree(base)
    if "no error" in msg and os.getuid() != 0:
        pytest.skip("this user may write into a 0o555 directory")
    assert msg == f"run directory {base / 'locked' / 'run'} cannot be written: permission denied", msg


@contextlib.contextmanager
def tiny_fs(path, size: str, ro: bool = False):
    """A tmpfs of `size` mounted on `path` (root only), unmounted after; skips where it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_read_only_file_system_at_start(tmp_path):
    with tiny_fs(tmp_path / "fs", "64k", ro=True) as fs:
        with pytest.raises(UserError) as e:
            check_run_dir(fs / "run")
        _one_line(e, "cannot be written: read-only file system")


def test_full_file_system_at_start(tmp_path):
    with tiny_fs(tmp_path / "fs", "64k") as fs:
        (fs / "filler").write_bytes(b"\0" * (64 * 1024))  # fills it to the last page
        with pytest.raises(UserError) as e:
            check_run_dir(fs)
        _one_line(e, "no space left on device")
        with pytest.raises(UserError) as e:
            check_free_space(fs, 1 << 20)
        _one_line(e, "GiB free", "needs about")
    check_free_space(tmp_path, 1)


# --- the lock -------------------------------------------------------------------------------

HOLDER = """
import sys, time
from reca.engine.rundir import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_second_process_fails_at_once_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(UserError) as e:
            RunLock(tmp_path)
        assert time.perf_counter() - t0 < 1.0, "refused at once, not after a wait"
        _one_line(e, f"run directory {tmp_path} is in use by another reca process (pid {holder.pid})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK).read_text().strip() == str(holder.pid)  # the stale lock's pid is still written
    with RunLock(tmp_path):
        assert (tmp_path / LOCK).read_text().strip() == str(os.getpid())
    with RunLock(tmp_path):  # released by close
        pass


def test_lock_is_per_open_file_even_in_one_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError) as e:
            RunLock(tmp_path)
        _one_line(e, f"pid {os.getpid()}")


# --- leftovers, --overwrite, config.json ----------------------------------------------------

def test_orphan_temporary_files_are_removed(tmp_path):
    orphans = [".checkpoint.pt.k2j3_x.tmp", ".metrics.jsonl.abc.tmp", ".config.json.q.tmp", ".write-probe.77.tmp"]
    for name in orphans + ["notes.tmp", "checkpoint.pt", ".hidden.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    removed = clean_orphans(tmp_path)
    assert sorted(p.name for p in removed) == sorted(orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "checkpoint.pt", "notes.tmp"]


def test_overwrite_moves_the_earlier_run_aside(tmp_path):
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    atomic_save({"step": 7, "model": {}, "optimizer": {}, "scheduler": {}, "data": {}, "rng": {}}, run / CHECKPOINT)
    for name in ("config.json", "metrics.jsonl", "loss.png", "recon_step5.png", "recon_step7.png", "tb/events.1",
                 "tokenizer/vocab.json", "my-notes.txt"):
        (run / name).write_text(name)
    with RunLock(run):
        moved = replace_run(run)
    assert moved.parent == run and moved.name.startswith("replaced-")
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK, moved.name, "my-notes.txt"])
    assert sorted(p.name for p in moved.iterdir()) == sorted(
        [CHECKPOINT, "config.json", "metrics.jsonl", "loss.png", "recon_step5.png", "recon_step7.png", "tb",
         "tokenizer"])
    assert load_checkpoint(moved)["step"] == 7  # nothing lost: the old run can still be resumed from there
    assert (moved / "tb" / "events.1").read_text() == "tb/events.1"
    assert replace_run(run) is None  # nothing left to move
    (run / "config.json").write_text("{}")
    again = replace_run(run)  # twice within one second: another folder, the first one untouched
    assert again != moved and (again / "config.json").exists() and (moved / CHECKPOINT).exists()


@pytest.mark.parametrize("content,needle", [
    (None, "nothing to resume"),
    ('{"train": {"steps": 3', "does not parse as JSON"),
    ("[1, 2]", "holds a list, not a config object"),
    (b"\xff\xfe\x00", "does not parse as JSON"),
], ids=["missing", "torn", "list", "binary"])
def test_hand_edited_config_json_is_one_line(tmp_path, content, needle):
    if isinstance(content, bytes):
        (tmp_path / "config.json").write_bytes(content)
    elif content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(UserError) as e:
        read_run_config(tmp_path)
    _one_line(e, needle)


def test_read_run_config(tmp_path):
    (tmp_path / "config.json").write_text('{"train": {"seed": 3}}')
    assert read_run_config(tmp_path) == {"train": {"seed": 3}}


# --- metrics.jsonl --------------------------------------------------------------------------

def _rows(steps):
    return [{"step": s, "loss": 1.0 / s} for s in steps]


def test_torn_last_line_is_skipped_and_resume_writes_valid_json(tmp_path):
    m = MetricsWriter(tmp_path, tensorboard=False)
    m.write(_rows(range(1, 13)))
    m.close()
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 13, "loss": 0.0')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 13))
    m = MetricsWriter(tmp_path, tensorboard=False, resume_step=10)  # checkpoint at 10
    m.write(_rows([11, 12]))
    m.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))  # every line parses
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}')
    m = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)
    m.write(_rows([3]))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_bad_line_inside_the_file_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError) as e:
        read_metrics(tmp_path)
    _one_line(e, "metrics.jsonl line 2 is not a metrics row")


def test_resume_rewrite_is_atomic(tmp_path, monkeypatch):
    """A kill during the resume's rewrite leaves the old file whole (the rewrite goes to a
    temporary file renamed over it)."""
    MetricsWriter(tmp_path, tensorboard=False).write(_rows(range(1, 6)))
    before = (tmp_path / "metrics.jsonl").read_text()

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]

