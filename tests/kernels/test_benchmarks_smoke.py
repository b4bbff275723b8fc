"""The kernel benchmark scripts run end to end at tiny shapes (`--smoke`; CPU under the interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU path")
def test_run_all_smoke(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/kernels/run_all.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "reca_bench_smoke").glob("*.json"))
    assert len(written) == 5, written
