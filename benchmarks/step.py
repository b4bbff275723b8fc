"""Whole-step benchmark: a thin wrapper of `reca bench step` (the code lives in reca.engine.bench.step,
which is installed; this directory is not). Same arguments:

    python benchmarks/step.py --preset tiny --steps 10
"""
import sys

from reca.engine.cli import main

if __name__ == "__main__":
    main(["bench", "step", *sys.argv[1:]])
