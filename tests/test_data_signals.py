"""Data worker processes ignore SIGINT and SIGTERM: a stop sent to the whole process group (a
container stop, a batch scheduler, Ctrl-C) reaches the main process alone, which owns the stop;
the loader goes on giving the same batches and then closes (or exits) cleanly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from reca.engine.data import build_loader
from test_data import VIEWS, assert_same, cfg, photos, take


def test_workers_ignore_sigterm_and_sigint(tmp_path):
    c = cfg(photos(tmp_path, 8), batch_size=3, num_workers=2)
    ref = take(build_loader(cfg(c.source, batch_size=3), VIEWS), 6)
    loader = build_loader(c, VIEWS)
    try:
        got = take(loader, 2)
        procs = list(loader._workers._workers)
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        os.kill(procs[0].pid, signal.SIGTERM)
        os.kill(procs[1].pid, signal.SIGINT)
        time.sleep(0.5)  # a worker that died would be seen by now (SIGCHLD -> error in next())
        assert all(p.is_alive() for p in procs)
        got += take(loader, 4)  # 18 samples of 8 files: both workers serve again
        assert_same(ref, got)
    finally:
        loader.close()
    assert not any(p.is_alive() for p in procs)


SCRIPT = """
import signal, sys, time
from reca.engine.config import DataConfig
from reca.engine.data import build_loader
from reca.models.adapter import ViewSpec

got = []
for sig in (signal.SIGTERM, signal.SIGINT):  # the engine's part: note the stop, finish the step
    signal.signal(sig, lambda s, f: got.append(s))
views = ViewSpec(und_size=16, und_mean=(0.5,) * 3, und_std=(0.25,) * 3, gen_size=32)
loader = build_loader(DataConfig(source=sys.argv[1], batch_size=3, num_workers=2), views)
next(loader)
print("ready", flush=True)
end = time.monotonic() + 30
while len(got) < 2 and time.monotonic() < end:
    time.sleep(0.01)
keys = [k for _ in range(4) for k in next(loader).keys]
print("stopped by", sorted(got), "then", len(keys), "samples", flush=True)
# the loader is left open: the exit must end its workers, which ignore SIGTERM, without hanging
"""


def test_a_stop_sent_to_the_process_group_reaches_the_main_process_alone(tmp_path):
    root = photos(tmp_path / "img", 8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's reca
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), str(root)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's would be
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert f"stopped by {sorted([int(signal.SIGINT), int(signal.SIGTERM)])} then 12 samples" in out, (out, err)
    assert "DataLoader worker" not in err and "Traceback" not in err, err
