"""Every family's torchrun run resumes with the losses of an uninterrupted run: 2 -> 2 ranks
(`--resume`) and after an elastic restart (`torchrun --max-restarts 1`) for tiny (flow),
harmon-tiny, bagel-tiny, showo-tiny and openuni-tiny under FSDP and harmon-tiny under DDP (a
trainable table no step reaches); 1 -> 2 (a one-process run's checkpoint.pt) and 2 -> 1 for the
families tests/test_distributed.py does not resume that way (it has tiny and bagel-tiny).

One torchrun launch (this file's `__main__`, 2 gloo ranks) does all the 2-rank work in-process
through `train_distributed`, the path `reca train` takes under torchrun: attempt 0 trains each
uninterrupted reference and its 2 -> 2 and 1 -> 2 continuations, tries three refusals, lays out
for each config a run cut off after step HALF + 1 (step-HALF/ its newest folder, step HALF + 1
logged: a crash), then loses rank 1 to SIGKILL; torchrun starts both ranks again (attempt 1),
which continue every cut-off run on their own, as an elastic restart does. The interpreter and
torch are imported twice per rank in all, not once per config.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from test_distributed import _env, losses, rows, run_ok, simulate, torchrun

STEPS, HALF = 8, 4
SETS = ["data.batch_size=2", "output.log_every=1", "optim.schedule=constant", "train.device=cpu",
        f"train.steps={STEPS}", f"output.ckpt_every={HALF}", "output.tensorboard=false", "output.preview_images=0"]
FAMILIES = ["tiny", "harmon-tiny", "bagel-tiny", "showo-tiny", "openuni-tiny"]
CONFIGS = [(name, "fsdp") for name in FAMILIES] + [("harmon-tiny", "ddp")]
# 1 -> 2 and 2 -> 1 of tiny and bagel-tiny: tests/test_distributed.py (bagel-tiny with its EMA)
ONE_TO_TWO = ["harmon-tiny", "showo-tiny", "openuni-tiny"]
TOL = 1e-5  # relative, per step's loss: see tests/test_distributed.py's TOL
REFUSALS = ("seed", "steps", "metadata")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, str]:
    """The one-process halves (HALF steps of each family, here), then the one launch."""
    from reca.engine.cli import main

    root = tmp_path_factory.mktemp("resume")
    for name in ONE_TO_TWO:
        main(["train", "--quiet", "--preset", name, "--out", str(root / f"one-{name}"), *(f"--set={s}" for s in SETS),
              f"--set=train.steps={HALF}"])
    proc = run_ok(torchrun(__file__, str(root), restarts=1), timeout=600)
    return root, proc.stdout + proc.stderr


@pytest.mark.parametrize("name,strategy", CONFIGS)
def test_two_ranks_resume_two_ranks(job, name, strategy):
    """2 -> 2 with `--resume` from step-HALF/: every step once, and each loss the uninterrupted
    run's (each rank gets its RNG states back: equal but for the order of float sums)."""
    root, _ = job
    run, ref = root / f"resume-{name}-{strategy}", root / f"{name}-{strategy}"
    assert [row["step"] for row in rows(ref)] == list(range(1, STEPS + 1))
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(losses(ref), rel=TOL)
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{HALF}", f"step-{STEPS}"]


@pytest.mark.parametrize("name,strategy", CONFIGS)
def test_an_elastic_restart_continues_every_family(job, name, strategy):
    """After torchrun's restart the ranks find the cut-off run's step-HALF/ on their own (no
    --resume): step HALF + 1 is taken again, logged once, and the losses are the uninterrupted
    run's. Before the fix of frozen and never-stepped parameters, bagel-tiny and harmon-tiny
    failed here with missing keys."""
    root, out = job
    run, ref = root / f"elastic-{name}-{strategy}", root / f"{name}-{strategy}"
    assert f"reca: torchrun restart 1 after a failed rank: resuming at step {HALF} in {run}" in out
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(losses(ref), rel=TOL)


@pytest.mark.parametrize("name", ONE_TO_TWO)
def test_one_process_resumes_in_two_ranks(job, name):
    """1 -> 2: a one-process run's checkpoint.pt continued by 2 ranks under FSDP (rank 0 reads
    it into its host copy, then every rank's shards fill from it), against one process that
    switches world size at step HALF."""
    root, _ = job
    run = root / f"one-{name}"
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    want, _ = simulate(name, [1] * HALF + [2] * HALF, SETS)
    assert losses(run) == pytest.approx(want, rel=TOL)
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{STEPS}"]


@pytest.mark.parametrize("name", ["showo-tiny", "openuni-tiny"])
def test_two_ranks_resume_in_one_process(job, tmp_path, name):
    """2 -> 1 for the families tests/test_distributed.py does not cover: the 2-rank run's
    step-HALF/ continued by a plain `reca train --resume` (a group of one, here in this process)
    equals one process that switches world size at step HALF, the 2-rank steps before it
    included (they are the 2-rank run's: one process at the global batch)."""
    from reca.engine.cli import main

    root, _ = job
    ref = root / f"{name}-fsdp"
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / f"step-{STEPS}")
    main(["train", "--quiet", "--resume", str(run)])
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    want, _ = simulate(name, [2] * HALF + [1] * HALF, SETS)
    assert losses(run) == pytest.approx(want, rel=TOL)


@pytest.mark.parametrize("case", REFUSALS)
def test_a_resume_refused_on_one_rank_is_refused_on_every_rank(job, case):
    """A changed seed, --steps below the run's step, a step folder without .metadata: every
    rank raises the same one line at the same point (`distributed.agreed`), none is left in a
    collective, and the job goes on to the next config (the launch finished)."""
    root, _ = job
    said = [(root / f"refusal-{case}-rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and said[0].startswith(("cannot resume", f"{root}")), said
    assert {"seed": "train.seed changed", "steps": "past train.steps", "metadata": ".metadata is missing"}[case] in said[0]


def _cut(ref: Path, run: Path, last: int) -> None:
    """`ref` as a crash after step `last` leaves it: step-HALF/ the newest folder, the metrics
    of the steps after it up to `last` already written."""
    shutil.copytree(ref, run)
    shutil.rmtree(run / f"step-{STEPS}")
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("step", 0) <= last]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")


def _worker(root: Path) -> None:
    """Each rank of the launch (see the module)."""
    import torch.distributed as dist

    from reca.engine.config import apply_overrides, load_config
    from reca.engine.distributed import train_distributed
    from reca.engine.errors import UserError
    from reca.engine.presets import preset

    def cfg(name: str, strategy: str, run: Path):
        return apply_overrides(preset(name), [*SETS, f"distributed.strategy={strategy}", f"output.dir={run}"])

    if os.environ["TORCHELASTIC_RESTART_COUNT"] != "0":  # attempt 1: every cut-off run goes on by itself
        for name, strategy in CONFIGS:
            train_distributed(cfg(name, strategy, root / f"elastic-{name}-{strategy}"), quiet=True)
        dist.destroy_process_group()  # before exit: a gloo group torn down with the statics can abort the rank
        return
    rank = int(os.environ["RANK"])
    for name, strategy in CONFIGS:
        ref = root / f"{name}-{strategy}"
        train_distributed(cfg(name, strategy, ref), quiet=True)
        if rank == 0:
            _cut(ref, root / f"resume-{name}-{strategy}", STEPS)
            _cut(ref, root / f"elastic-{name}-{strategy}", HALF + 1)
        dist.barrier()
        train_distributed(cfg(name, strategy, root / f"resume-{name}-{strategy}"), resume=True, quiet=True)
    for name in ONE_TO_TWO:
        run = root / f"one-{name}"
        saved = apply_overrides(load_config(run / "config.json"), [f"output.dir={run}", f"train.steps={STEPS}"])
        train_distributed(saved, resume=True, quiet=True)
    ref = root / "tiny-fsdp"
    for case in REFUSALS:
        run = root / f"refused-{case}"
        if rank == 0:
            _cut(ref, run, HALF)
            if case == "metadata":
                (run / f"step-{HALF}" / ".metadata").unlink()
        dist.barrier()
        sets = {"seed": ["train.seed=7"], "steps": [f"train.steps={HALF - 1}"], "metadata": []}[case]
        try:
            train_distributed(apply_overrides(load_config(run / "config.json"), [f"output.dir={run}", *sets]),
                              resume=True, quiet=True)
        except UserError as e:
            (root / f"refusal-{case}-rank{rank}.txt").write_text(str(e))
    dist.barrier()
    if rank == 1:  # a lost rank: torchrun starts both again
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # rank 0: until torchrun stops it


if __name__ == "__main__":  # under torchrun (see the module)
    _worker(Path(sys.argv[1]))
