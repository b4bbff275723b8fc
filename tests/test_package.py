"""Packaging: only `reca` is installed; `engine`, `kernels`, `models` never become top-level modules,
and the checkout root shadows no installed package (Hugging Face's `kernels`, reca itself)."""
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
            "print([m for m in ('engine', 'kernels', 'models') if (u.find_spec(m) or 0) and "
            "sys.argv[1] in str(u.find_spec(m).origin or u.find_spec(m).submodule_search_locations)])")
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith(str(target)) and second == "[]"


# --- the checkout root shadows nothing ------------------------------------------------------------
# Python started in the checkout puts it first on sys.path (`python -c`, `python -m`); the
# top-level folders hold no __init__.py, so an installed regular package of the same name wins
# (Hugging Face's `kernels`, which transformers >= 5.25 imports) and `reca` is the installed one.

FAMILY_TINY = ("tiny", "harmon-tiny", "bagel-tiny", "openuni-tiny", "showo-tiny")
FROM_ROOT = (
    "import sys, kernels, reca, transformers; import reca.kernels, reca.models, reca.engine.cli\n"
    "from reca.engine.presets import preset\n"
    "from reca.models import build_model\n"
    f"for name in {FAMILY_TINY!r}:\n"  # every family, transformers' model classes included
    "    build_model(preset(name).model, reca.kernels.get_ops('torch'))\n"
    "print(kernels.__file__); print(reca.__file__); print(reca.engine.cli.__file__)\n"
)


def _site_packages() -> str:
    import sysconfig
    return sysconfig.get_paths()["purelib"]


def _check_from_root(python: str, env=None) -> list[str]:
    proc = subprocess.run([python, "-c", FROM_ROOT], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file, reca_file, cli_file = proc.stdout.strip().splitlines()[-3:]
    assert not kernels_file.startswith(str(ROOT) + "/kernels"), kernels_file  # the ecosystem's kernels
    assert Path(kernels_file).parent.name == "kernels" and "site-packages" in kernels_file, kernels_file
    helped = subprocess.run([python, "-m", "reca.engine", "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert helped.returncode == 0 and "usage: reca" in helped.stdout, helped.stderr[-2000:]
    return [reca_file, cli_file]


def test_regular_install_in_a_fresh_venv_works_from_the_checkout_root(wheel, tmp_path):
    """`pip install .` into a fresh venv (the test venv's packages beside it for torch and
    transformers, its editable reca finder not): from the checkout root, `import kernels` is the
    installed package, every family builds, `python -m reca.engine` runs the installed reca."""
    import venv
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a path listed in a .pth is no site dir: its own .pth files (the editable finder) stay unread
    Path(site, "deps.pth").write_text(_site_packages() + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, capture_output=True)
    reca_file, cli_file = _check_from_root(python)
    assert reca_file.startswith(site) and cli_file.startswith(site), (reca_file, cli_file)


def test_editable_install_works_from_the_checkout_root():
    """The test venv's own editable install: the same from the checkout root, reca read in place."""
    reca_file, cli_file = _check_from_root(sys.executable)
    assert reca_file == str(ROOT / "src" / "reca" / "__init__.py") and cli_file == str(ROOT / "engine" / "cli.py")


def test_pythonpath_src_imports_the_checkout_without_an_install(tmp_path):
    """What the GPU suite does where nothing can be installed: PYTHONPATH=src, from any folder."""
    code = "import reca.engine.cli, reca.kernels.condition.reference as r; print(reca.engine.cli.__file__, r.__file__)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); " + code,
                           str(ROOT / "src")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(ROOT / "engine" / "cli.py"), str(ROOT / "kernels" / "condition" / "reference.py")]


def test_no_top_level_folder_is_a_regular_package():
    """The mechanism itself: none of the checkout's top-level folders holds an __init__.py."""
    assert [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()] == []
