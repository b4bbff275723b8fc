"""Every module of reca imports (the DALI backend only where DALI is installed), and importing
one binds nothing at top level outside `reca`. Run again by `make test` under transformers 5.17,
the GPU image's version, beside the model tests: the code must run on both."""
import importlib
import importlib.util
import pkgutil
import sys

import pytest

import reca

OPTIONAL = {"reca.engine.data.backends.dali": "nvidia.dali"}  # module -> the package it needs


def _modules() -> list[str]:
    names = []
    for pkg in ("reca.engine", "reca.kernels", "reca.models"):
        mod = importlib.import_module(pkg)
        names += [pkg] + [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
    return sorted(set(names))


def test_every_module_imports():
    names = _modules()
    assert {"reca.engine.cli", "reca.kernels.condition.kernel", "reca.models.showo.model"} <= set(names)
    for name in names:
        need = OPTIONAL.get(name)
        if need and importlib.util.find_spec(need.split(".")[0]) is None:
            continue
        importlib.import_module(name)
    # the checkout's folders never become top-level modules, whatever was imported
    assert not {"engine", "models"} & set(sys.modules)
    if "kernels" in sys.modules:  # Hugging Face's, imported by transformers >= 5.25
        assert "site-packages" in (sys.modules["kernels"].__file__ or ""), sys.modules["kernels"]


def test_transformers_version_is_the_one_asked_for():
    """`make test`'s compat tier sets RECA_TRANSFORMERS to the version it installed: prove it is
    the one imported (a PYTHONPATH that lost to the venv's copy would test nothing)."""
    want = __import__("os").environ.get("RECA_TRANSFORMERS")
    if not want:
        pytest.skip("not the compat tier")
    import transformers
    assert transformers.__version__ == want


def test_importing_the_model_package_imports_no_family():
    """`import reca.models` (and the config, the presets, the build) binds the protocol and the
    family registry, not the families: each is imported when a run builds it (transformers and
    the five families took seconds before; `python -X importtime -c "import reca.models"`)."""
    import subprocess

    code = ("import sys, reca.models, reca.engine.presets, reca.engine.build\n"
            "families = sorted(m for m in sys.modules if m.split('.')[:2] == ['reca', 'models'] and m.count('.') >= 2 "
            "and m.split('.')[2] in ('flow', 'harmon', 'bagel', 'openuni', 'showo'))\n"
            "assert not families and 'transformers' not in sys.modules, (families, 'transformers' in sys.modules)\n"
            "import reca\n"
            "reca.preset('harmon-tiny')\n"
            "assert 'reca.models.harmon' in sys.modules and 'reca.models.bagel' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
