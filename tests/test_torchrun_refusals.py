"""How a torchrun job ends when it cannot go on, as the user sees it: 2 gloo processes under
`torchrun` through the CLI (`engine/ending.py`).

A refusal (one rank's or every rank's) is reca's one line, once, every rank exiting 2, and no
Python traceback from a worker. Under `reca launch` (torchrun run in reca's process,
`engine/launch.py`) that line is the last on the terminal and the job's status is 2; under plain
torchrun, torchrun prints its own report after it (a log line, its ChildFailedError traceback and
its box, whose root cause shows reca's line) and exits 1, a status reca cannot change there. A
rank killed without `--max-restarts` leaves one line from a survivor naming the newest whole
step-N/ and the command that continues the run (`reca launch`: last, status 1). SIGTERM to the
launcher: the step's step-N/, reca's line (`reca launch`: last, status 143; torchrun: then its
SignalException traceback, status 1).

Permission refusals run with the DAC capabilities dropped (`setpriv --bounding-set`): as root,
permission bits would not apply. (The venv's Python lies under /root, mode 700, which an
unprivileged user such as nobody cannot reach; root without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH is held to the owner's bits of its own files, which the tests clear.)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed import _env, _workers, rows, torchrun

SETS = ["data.batch_size=2", "output.log_every=1", "optim.schedule=constant", "train.device=cpu",
        "output.ckpt_every=2", "output.tensorboard=false", "output.preview_images=0"]
# What torchrun itself prints after a worker exits non-zero: its log lines, its traceback and box.
TORCHRUN = re.compile(r"^([IWE]\d{4} |Traceback \(most recent call last\)|\s|torch\.distributed\.elastic\.|[=-]+$|"
                      r"reca\.engine FAILED$|Failures:$|Root Cause|\[\d+\]:$)")


def _unprivileged() -> list[str]:
    """The prefix that runs a command without the right to ignore permission bits."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def reca_launch(*args: str, restarts: int = 0) -> list[str]:
    """`reca launch` (torchrun's options, then reca's command), as `torchrun` above."""
    return [sys.executable, "-m", "reca.engine", "launch", "--nproc-per-node", "2", "--standalone", "--max-restarts",
            str(restarts), *args]


def _launch(*args: str, prefix: tuple[str, ...] = (), ours: bool = False) -> subprocess.CompletedProcess:
    cmd = reca_launch("train", "--quiet", *args) if ours else torchrun("-m", "reca.engine", "train", "--quiet", *args)
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=300, env=_env())


def _said_last(out: str) -> str:
    """Under `reca launch`: reca's one line, said once and last; before it only torchrun's log
    lines (its banner, "failed (exitcode: N)"), and no traceback of anyone's."""
    lines = [x for x in out.splitlines() if x]
    ours = [x for x in lines if x.startswith("reca:")]
    assert len(ours) == 1 and lines[-1] == ours[0], out
    assert "Traceback" not in out and "ChildFailedError" not in out and "[rank" not in out, out
    assert all(re.match(r"[IWE]\d{4} ", x) for x in lines[:-1]), out
    return ours[0]


def _said_once(out: str, status: int) -> str:
    """reca's one line in torchrun's combined output: said once, after it only torchrun's own
    report, every rank's status `status` with that line as its cause, and no worker traceback."""
    lines = out.splitlines()
    ours = [i for i, line in enumerate(lines) if line.startswith("reca:")]
    assert len(ours) == 1, out
    line = lines[ours[0]]
    after = [x for x in lines[ours[0] + 1:] if x]
    assert all(TORCHRUN.match(x) for x in after), out
    assert out.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in out, out  # torchrun's alone
    assert not any(x.startswith("[rank") for x in lines), out  # no worker's traceback pages
    codes = re.findall(r"exitcode\s*: (-?\d+)", out)
    assert codes and all(int(c) == status for c in codes), out
    causes = re.findall(r"traceback : (.*)", out)
    assert causes and all(c == line for c in causes), out
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A torchrun run's layout (step-2/, step-4/), trained in this process as a group of one."""
    from reca.engine.config import apply_overrides
    from reca.engine.distributed import train_distributed
    from reca.engine.presets import preset

    run = tmp_path_factory.mktemp("finished") / "run"
    train_distributed(apply_overrides(preset("tiny"), [*SETS, "train.steps=4", f"output.dir={run}"]), quiet=True)
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_a_busy_run_is_one_line_under_torchrun(finished, tmp_path):
    """Rank 0 finds the run directory locked by another process: before, rank 0 alone raised
    and rank 1 died in a gloo "connection closed" traceback (exit 1); now the ranks refuse
    together at the lock, the line is said once and every rank exits 2; under `reca launch` the
    line is the last on the terminal (before: torchrun's traceback and box after it) and the
    job's status is 2 (torchrun's: 1)."""
    from reca.engine.rundir import RunLock

    run = _copy(finished, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    with RunLock(run):
        proc = _launch("--resume", str(run), "--steps", "6", ours=True)
    assert proc.returncode == 2  # reca launch: the refusal's status (torchrun's own would be 1)
    line = _said_last(proc.stdout + proc.stderr)
    assert line.startswith("reca: error: run directory") and f"pid {os.getpid()}" in line
    assert (run / "metrics.jsonl").read_bytes() == before and not (run / "step-6").exists()


def test_a_refused_job_is_never_resumed_by_a_restart(finished, tmp_path):
    """`--out RUN` of a run that holds one, under `--max-restarts 1`: torchrun restarts the
    refused job, and the restarted ranks (an elastic restart resumes RUN's newest step-N/ by
    itself) used to train on the run they were refused; now they refuse again, quietly (the
    line was said), and nothing is written."""
    run = _copy(finished, tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    proc = subprocess.run(torchrun("-m", "reca.engine", "train", "--quiet", "--preset", "tiny", "--out", str(run),
                                   "--steps", "6", *(f"--set={s}" for s in SETS), restarts=1),
                          capture_output=True, text=True, timeout=300, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "/attempt_1/" in out, out  # torchrun restarted the job once
    line = _said_once(out, 2)
    assert line == (f"reca: error: {run} already holds a run; continue it with --resume {run}, or replace it with "
                    "--overwrite")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock") == \
        [b for b in before if b[0] != ".lock"]


def test_a_missing_shard_is_one_line_under_torchrun(finished, tmp_path):
    """A step folder missing a shard: DCP's load fails on every rank (before: a page of
    CheckpointException per rank, exit 1); now one line naming the file and the older folder."""
    run = _copy(finished, tmp_path)
    (run / "step-4" / "__0_0.distcp").unlink()
    proc = _launch("--resume", str(run), "--steps", "6", ours=True)
    assert proc.returncode == 2
    line = _said_last(proc.stdout + proc.stderr)
    assert "step-4/__0_0.distcp is missing" in line and "the newest whole folder is step-2" in line, line


def test_a_refusal_of_rank_0_alone_mid_job_is_one_line(finished, tmp_path):
    """A read-only config.json on --resume (rank 0 writes it, after the checkpoint is loaded,
    while rank 1 goes on into the first step's all-reduce): before, a PermissionError traceback
    on rank 0 and gloo's on rank 1; now rank 0's one line, and rank 1, whose collective rank 0's
    exit broke, ends quietly with the same status."""
    run = _copy(finished, tmp_path)
    os.chmod(run / "config.json", 0o444)
    proc = _launch("--resume", str(run), "--steps", "6", prefix=tuple(_unprivileged()))
    assert proc.returncode == 1
    line = _said_once(proc.stdout + proc.stderr, 2)
    assert line == f"reca: error: cannot write {run / 'config.json'}: permission denied"
    assert [row["step"] for row in rows(run)] == [1, 2, 3, 4] and not (run / "step-6").exists()


def test_read_only_config_and_unlistable_data_are_one_line(tmp_path):
    """One process, through the CLI, without the right to ignore permission bits: `--resume`
    of a run whose config.json is read-only (before: a PermissionError traceback), and a data
    folder holding a subfolder that cannot be listed (before: its images left out silently, or
    "no image files" for the whole folder)."""
    from reca.engine.cli import main

    os.chmod(tmp_path, 0o755)
    run, data = tmp_path / "run", tmp_path / "data"
    main(["train", "--quiet", "--preset", "tiny", "--out", str(run), "--steps", "1", *(f"--set={s}" for s in SETS)])
    os.chmod(run / "config.json", 0o444)
    (data / "sub").mkdir(parents=True)
    os.chmod(data / "sub", 0o000)
    script = ("import sys\nfrom reca.engine.cli import main\n"
              "for argv in sys.argv[1:]:\n"
              "    try:\n        main(argv.split('|'))\n    except SystemExit as e:\n"
              "        print('status', e.code, flush=True)\n")
    before = (run / "checkpoint.pt").read_bytes()
    try:
        proc = subprocess.run([*_unprivileged(), sys.executable, "-c", script,
                               f"train|--quiet|--resume|{run}|--steps|2",
                               f"train|--quiet|--data|{data}|--out|{tmp_path / 'other'}|--set=train.device=cpu"],
                              capture_output=True, text=True, timeout=300, env=_env())
    finally:
        os.chmod(data / "sub", 0o755)
    assert proc.stdout.split() == ["status", "2", "status", "2"], proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"reca: error: cannot write {run / 'config.json'}: permission denied",
        f"reca: error: data source {str(data)!r}: cannot list the folder {data / 'sub'}: permission denied"], proc.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


def _train_until(run: Path, folder: str, restarts: int = 0, ours: bool = False) -> subprocess.Popen:
    """A 2-rank tiny run of many steps (under `reca launch` if `ours`, else torchrun), returned
    once RUN/`folder` exists."""
    args = ("train", "--quiet", "--preset", "tiny", "--out", str(run), "--steps", "100000", *(f"--set={s}" for s in SETS))
    cmd = reca_launch(*args, restarts=restarts) if ours else torchrun("-m", "reca.engine", *args, restarts=restarts)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.monotonic() + 240
    while not (run / folder).is_dir():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"the job ended before {folder}: {job.communicate()[0][-3000:]}")
        time.sleep(0.1)
    return job


def test_a_killed_rank_leaves_the_command_that_continues(tmp_path):
    """SIGKILL to rank 1 of a `reca launch` job without --max-restarts: before, rank 0 died in
    gloo's "connection closed by peer" traceback and nobody said how to continue; now rank 0
    says, in one line, the newest whole step-N/ and the command that resumes; it is the last
    line and the job's status 1."""
    run = tmp_path / "run"
    job = _train_until(run, "step-4", ours=True)
    try:
        os.kill(_workers(job.pid)[1], signal.SIGKILL)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, out
    newest = max(run.glob("step-*"), key=lambda p: int(p.name[5:]))
    assert _said_last(out) == (f"reca: another rank of this job stopped (killed or crashed): the newest whole "
                               f"checkpoint is {newest} (step {newest.name[5:]}); continue with: reca launch "
                               f"--nproc-per-node 2 train --resume {run}"), out
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out), out


@pytest.mark.parametrize("ours", [True, False], ids=["reca-launch", "torchrun"])
def test_sigterm_to_the_launcher_writes_the_step_and_says_how_to_continue(tmp_path, ours):
    """SIGTERM to the launcher (a scheduler's stop): it forwards it to the ranks, which finish
    the step, write its step-N/ and exit 143; rank 0's line names the command that continues.
    `reca launch` then exits 143 with that line last; torchrun raises its SignalException (a
    traceback after reca's line) and exits 1: its own status, which reca cannot change there."""
    run = tmp_path / "run"
    job = _train_until(run, "step-2", ours=ours)
    try:
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    launcher = "reca launch --nproc-per-node 2 train" if ours else "torchrun --nproc-per-node 2 -m reca.engine train"
    pattern = (rf"reca: interrupted \(SIGTERM\) after step (\d+), its checkpoint written; continue with: "
               rf"{re.escape(launcher)} --resume {re.escape(str(run))}")
    if ours:
        assert job.returncode == 143, out
        line = _said_last(out)
    else:
        assert job.returncode == 1, out
        line = [x for x in out.splitlines() if x.startswith("reca:")]
        assert len(line) == 1, out
        line = line[0]
        tail = out[out.index(line) + len(line):]
        assert "SignalException" in tail and all(TORCHRUN.match(x) for x in tail.splitlines() if x), out
    assert re.fullmatch(pattern, line), out
    step = int(re.search(r"after step (\d+)", line).group(1))
    assert (run / f"step-{step}").is_dir() and [row["step"] for row in rows(run)][-1] == step


def test_reca_launch_status_is_the_jobs_own(tmp_path):
    """`reca launch`'s ending from torchrun's failures: a line a reca rank recorded (the earliest
    such rank's status), else the first failure's status, a signal N as 128 + N."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from reca.engine.launch import ending_of

    def failure(rank: int, code: int, line: str | None = None, when: int = 0) -> ProcessFailure:
        path = tmp_path / f"{rank}.json"
        if line is not None:  # the layout reca.engine.ending writes
            path.write_text(json.dumps({"message": {"message": line, "extraInfo": {"timestamp": str(when)}}}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(path))

    refused = {0: failure(0, 2, "reca: error: busy", 5), 1: failure(1, 2, "reca: error: busy", 6)}
    assert ending_of(refused) == ("reca: error: busy", 2)
    lost = {0: failure(0, 1, "reca: another rank of this job stopped", 9), 1: failure(1, -9)}
    assert ending_of(lost) == ("reca: another rank of this job stopped", 1)
    assert ending_of({1: failure(1, -11)}) == (None, 139)  # a segfault: no line of reca's, 128 + 11
    assert ending_of({0: failure(0, 3, "Traceback ... a bug", 1)}) == (None, 3)  # not reca's line
