"""Runs every kernel benchmark in one go (GPU), or all smoke runs (`--smoke`, CPU OK).

    python benchmarks/kernels/run_all.py [--smoke] [any flag of the scripts, e.g. --no-compile]
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_condition.py", "bench_flow_matching.py", "bench_ddpm.py", "bench_linear_ce.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"=== {script} {' '.join(sys.argv[1:])}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *sys.argv[1:]]).returncode:
            failed.append(script)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
