"""benchmarks/gpu_suite.sh fits the device: `--plan` lists the stages of each call with their
limits, without running anything or starting Python, and call 1 (every GPU test and the headline
figures) adds up to at most 480 s: a lent GPU gives a session 15 minutes, the machine's start
included, and one call at most 10."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
CALL1_LIMIT, CALL_LIMIT = 480, 600


def suite(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=30,
                          env=env or dict(os.environ))


def plan(tmp_path) -> tuple[dict[str, dict[str, tuple[int, str]]], str]:
    """{call: {stage: (limit, command)}} from `--plan`, run with python and python3 replaced by
    a program that leaves a mark: the plan must not start one."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python", "python3"):
        (fake / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/python-ran\nexit 99\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(fake / "python3")}
    proc = suite("--plan", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "python-ran").exists()
    calls: dict[str, dict[str, tuple[int, str]]] = {}
    call = None
    for line in proc.stdout.splitlines():
        if m := re.fullmatch(r"call (\d):", line):
            call = calls.setdefault(m.group(1), {})
        elif line.startswith("call "):
            call = None  # the totals
        elif call is not None and (m := re.fullmatch(r"  (\S+)\s+(\d+)s  (.+)", line)):
            assert m.group(1) not in call, f"stage {m.group(1)} twice in one call"
            call[m.group(1)] = (int(m.group(2)), m.group(3))
    return calls, proc.stdout


def test_call_one_fits_in_eight_minutes_with_every_gpu_test_and_the_headline_figures(tmp_path):
    calls, out = plan(tmp_path)
    assert set(calls) == {"1", "2"}
    one, two = calls["1"], calls["2"]
    total = sum(limit for limit, _ in one.values())
    assert total <= CALL1_LIMIT
    assert f"call 1 total: {total}s of stage limits" in out
    assert sum(limit for limit, _ in two.values()) <= CALL_LIMIT
    assert {"gpu_tests", "corpus", "step_harmon", "kernels", "data"} <= set(one)
    step = one["step_harmon"][1]
    assert "--preset harmon-1.5b" in step and "--profile" in step and "--modes" not in step  # reference and fast
    assert "run_all.py" in one["kernels"][1]
    assert "-m gpu" in one["gpu_tests"][1] and "gpu_tests_rest" in two  # every gpu test runs in one call or the other
    assert not set(one) - {"corpus"} & set(two)  # only the corpus is made in either call


def test_bad_arguments_are_one_line_errors():
    for args, what in ((["--call", "3"], "--call must be 1, 2 or all"), (["no_such_stage"], "unknown stage"),
                       (["--budget", "soon"], "--budget must be whole seconds")):
        proc = suite(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("gpu_suite: error: ") and what in proc.stderr, args
        assert proc.stderr.count("\n") == 1 and not proc.stdout
