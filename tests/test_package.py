"""Packaging: only `reca` is installed; `engine`, `kernels`, `models` never become top-level modules."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(proc.stderr[-2000:])
    (whl,) = out.glob("reca-*.whl")
    return whl


def test_wheel_installs_only_the_reca_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"reca"}, top
    for needed in ("reca/__init__.py", "reca/engine/train.py", "reca/kernels/condition/reference.py", "reca/engine/data/backends/dali.py", "reca/models/adapter.py",
                   "reca/engine/prompts/instructions.txt"):
        assert needed in names, needed
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "reca = reca.engine.cli:main" in entry


def test_installed_wheel_imports_from_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import reca.engine, reca.kernels, reca.models; "
            "import importlib.util as u; print(reca.engine.__file__); "
            "print([m for m in ('engine', 'kernels', 'models') if u.find_spec(m) is not None])")
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith(str(target)) and second == "[]"
