"""`reca launch [torchrun options] COMMAND [ARGS]`: torchrun, run in this process, that ends a
job the way `reca` ends one process.

    reca launch --nproc-per-node 8 train --preset bagel-7b-mot --data DIR --out RUN
    # is exactly
    torchrun --nproc-per-node 8 -m reca.engine train --preset bagel-7b-mot --data DIR --out RUN

The launch is PyTorch's own (`torch.distributed.run.run`: the same options, rendezvous, elastic
restarts, signal forwarding); only its ending differs. torchrun exits 1 whenever a worker exits
non-zero and prints its `ChildFailedError` traceback and report after whatever the workers
said, so reca's one line is never the last one on the terminal. Here the workers' own ending
decides (`reca.engine.ending`: each rank records its line in torchrun's error file):

    a refusal            (every rank exits 2)      -> its `reca: error: ...` line, last; exit 2
    a stop request       (SIGTERM / SIGINT to this process, forwarded to the ranks, which write
                         their step-N/ and say how to continue)  -> exit 143 / 130
    a lost rank          (the survivors' line: the newest step-N/ and the command that
                         continues)  -> that line, last; exit 1
    anything else        (a bug: a worker's traceback is above)  -> torchrun's report; the
                         first failed rank's status (128 + N for a signal N)
    success              -> exit 0
"""
from __future__ import annotations

import os
import signal
import sys

USAGE = "reca launch [torchrun options] COMMAND [ARGS]   (e.g. reca launch --nproc-per-node 2 train --preset tiny)"


def main(argv: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog = "reca launch"
    parser.usage = USAGE
    args = parser.parse_args(argv)
    if args.module or args.no_python:
        print("reca: error: reca launch runs reca's own command (COMMAND is train, bench, ...): leave out "
              "-m / --no-python", file=sys.stderr)
        sys.exit(2)
    # torchrun's positional script is reca's command: the workers run `python -m reca.engine COMMAND ...`
    args.training_script_args = [args.training_script, *args.training_script_args]
    args.training_script, args.module = "reca.engine", True
    os.environ["RECA_LAUNCHER"] = "reca launch"  # the workers' resume commands name this launcher
    try:
        run(args)
    except ChildFailedError as e:
        line, status = ending_of(e.failures)
        if line:
            print(line, file=sys.stderr, flush=True)
        sys.exit(status)
    except SignalException as e:  # the ranks got the signal and ended (their step-N/ written)
        sys.exit(128 + int(e.sigval))


def ending_of(failures: dict) -> tuple[str | None, int]:
    """torchrun's failed ranks (rank -> ProcessFailure) -> (reca's line to print last, or None,
    and the exit status): the line a reca rank recorded in its error file, with that rank's
    status; else the first failure's status (a signal N as 128 + N)."""
    said = [(f.timestamp, f.exitcode, _reca_line(f.message)) for f in failures.values()]
    mine = sorted(s for s in said if s[2] is not None and s[1] > 0)
    if mine:
        return mine[0][2], mine[0][1]
    first = min(failures.values(), key=lambda f: f.timestamp)
    return None, first.exitcode if first.exitcode > 0 else 128 + (-first.exitcode or signal.SIGKILL)


def _reca_line(message) -> str | None:
    """The line `reca.engine.ending` wrote into a rank's error file, or None (another cause)."""
    if isinstance(message, dict):
        message = message.get("message")
    return message if isinstance(message, str) and message.startswith("reca: ") else None
