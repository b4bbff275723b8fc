"""How a rank of a torchrun job ends when the job cannot go on: one true line for the whole
job, the same exit status on every rank, and no page of another rank's traceback.

    a refusal      (`UserError` on any rank: a busy run directory, a damaged checkpoint, a
                   changed config, a full disk)  -> its `reca: error: ...` line, printed once,
                   every rank exits 2
    a lost rank    (another rank died: killed, out of memory, a crash; gloo's "connection
                   closed by peer" here)  -> one line naming the newest whole step-N/ and the
                   command that continues the run, every surviving rank exits 1
    anything else  a bug: its traceback, as ever

The ranks agree through torchrun's store (a TCP key-value store the launcher hosts, alive
while ranks die): the rank that meets a refusal first claims the key `reca/said` with its line,
prints it and exits; every other rank, whether it met the same refusal, or an error from a
collective that rank's exit broke, finds the key and exits with the same status in silence. A
refusal therefore needs no collective of its own (one raised while other ranks sit in a
collective cannot deadlock: its exit ends their collective, and torchrun stops the ranks that
still wait), though most refusals are agreed before that, at `agree` points, where every rank
raises the same one. Each rank also writes the line into torchrun's error file
(TORCHELASTIC_ERROR_FILE), so the report torchrun prints when a worker exits non-zero shows it
as the root cause in place of "To enable traceback see ...".

A rank exits with `os._exit` once its line is out: the process group of a job whose peers are
gone cannot be shut down cleanly (gloo's destructors abort or wait on dead sockets).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

from reca.engine.errors import UserError

T = TypeVar("T")
REFUSED, LOST = 2, 1
KEY = "reca/said"
REFUSAL = "reca/refusal"  # in the store every attempt shares
# What a gloo collective raises when a peer's process is gone (a plain RuntimeError).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def resume_command(run: str | Path) -> str:
    """The command that continues `run`: under torchrun on one node with its rank count, on
    several the same launch (each node's own options) with `--resume`; else plain `reca`."""
    from reca.engine.distributed import launched

    if not launched():
        return f"reca train --resume {run}"
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    ours = bool(os.environ.get("RECA_LAUNCHER"))  # started by `reca launch` (reca.engine.launch)
    if world == local:
        return (f"reca launch --nproc-per-node {world} train --resume {run}" if ours else
                f"torchrun --nproc-per-node {world} -m reca.engine train --resume {run}")
    return (f"the same reca launch on every node, with train --resume {run}" if ours else
            f"the same torchrun launch on every node, with -m reca.engine train --resume {run}")


def _store():
    """The job's store (torchrun's, as the default process group holds it), or None before the
    group exists or after it was destroyed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _said(store, wait: float = 0.0) -> tuple[int, int, str] | None:
    """What another rank claimed -> (its rank, exit status, line), or None; waits up to `wait`
    seconds for a claim that may be on its way (a peer's exit can reach us before its claim)."""
    try:
        deadline = time.monotonic() + wait
        while not store.check([KEY]):  # polled: the store's own wait logs its timeout
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        rank, status, line = store.get(KEY).decode().split("\n", 2)
        return int(rank), int(status), line
    except Exception:  # the store itself is gone (it was rank 0's, and rank 0 died)
        return None


def end(line: str, status: int, *, say: bool = True) -> NoReturn:
    """End this rank with `line` said once for the job (the first rank to claim it prints it,
    unless `say` is False: an earlier attempt said it) and `status`; another rank's earlier
    claim wins, its status with it. Never returns."""
    try:  # torchrun's SIGTERM to the ranks still running once one has exited: this rank is ending
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    store = _store()
    first = _rank() == 0  # no store (before the group, or the group of one): the ranks' lines are alike
    if store is not None:
        mine = f"{_rank()}\n{status}\n{line}"
        try:
            got = store.compare_set(KEY, "", mine).decode()
        except Exception:
            got = mine
        first = got == mine
        if not first:
            _, status, line = got.split("\n", 2)
            status = int(status)
    _leave(line if first and say else None, line, status)


def earlier_refusal() -> str | None:
    """After an elastic restart: the refusal an earlier attempt of this job ended with (its
    message), or None. torchrun restarts the ranks after any failure, a refusal too; the new
    attempt must not then take the run directory as its own to resume."""
    from reca.engine import distributed

    store = distributed.job_store
    try:
        if store is None or not store.check([REFUSAL]):
            return None
        return store.get(REFUSAL).decode()
    except Exception:
        return None


def _leave(printed: str | None, line: str, status: int) -> NoReturn:
    path, recorded = os.environ.get("TORCHELASTIC_ERROR_FILE"), False
    if path:  # torchrun's report then shows reca's line as this rank's cause
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # torchrun's own layout (`ErrorHandler.record_exception`): its report prints py_callstack
            Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}))
            recorded = True
        except OSError:
            pass
    # under `reca launch` the launcher prints the recorded line last, after torchrun's own logs
    if printed is not None and not (recorded and os.environ.get("RECA_LAUNCHER")):
        print(printed, file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def refuse(message: str) -> NoReturn:
    """A `UserError` under torchrun: its line once for the job, exit status 2 on every rank;
    remembered for the attempts an elastic restart would start (`earlier_refusal`)."""
    from reca.engine import distributed

    if distributed.job_store is not None:
        try:
            distributed.job_store.compare_set(REFUSAL, "", message)
        except Exception:
            pass
    end(f"reca: error: {message}", REFUSED)


def peer_gone(e: BaseException) -> bool:
    """Whether `e` (or what it wraps) says another rank of the job is gone."""
    import torch.distributed as dist

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, getattr(dist, "DistNetworkError", ())) or any(s in str(e) for s in _PEER_GONE):
            return True
        e = e.__cause__ or e.__context__
    return False


def ended(run: str | Path, fn: Callable[[], T]) -> T:
    """`fn()` (a rank's whole `reca train`) with its endings (see the module): a refusal is
    left to the CLI (`refuse`); an error after another rank's claim ends this rank with that
    claim, quietly; a lost peer ends it with the line that says how to continue."""
    try:
        return fn()
    except (UserError, KeyboardInterrupt, SystemExit):  # refusals and stop requests: the CLI's to end
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if peer_gone(e):  # torchrun's SIGTERM to the survivors is on its way: this rank is ending anyway
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        store = _store()
        said = _said(store, wait=0.5 if peer_gone(e) else 0.0) if store is not None else None
        if said is not None:
            _leave(None, said[2], said[1])
        if peer_gone(e):
            end(lost_line(run), LOST)
        raise


def lost_line(run: str | Path) -> str:
    """The one line a surviving rank prints when another rank is gone: where the run stands and
    how to continue it (torchrun restarts it by itself while `--max-restarts` allows)."""
    from reca.engine.checkpoint.dcp import latest, step_of

    run = Path(run)
    folder = latest(run)
    if folder is not None:
        where = f"the newest whole checkpoint is {folder} (step {step_of(folder)})"
    elif (run / "checkpoint.pt").is_file():
        where = f"the newest checkpoint is {run / 'checkpoint.pt'} (the one-process run's)"
    else:
        where = "no checkpoint was written yet"
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if left > 0:
        return f"reca: another rank of this job stopped (killed or crashed): {where}; torchrun restarts the job from it"
    go = f"continue with: {resume_command(run)}" if folder is not None or (run / "checkpoint.pt").is_file() else \
        "start it again with --overwrite"
    return f"reca: another rank of this job stopped (killed or crashed): {where}; {go}"
