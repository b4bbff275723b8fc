"""Installs the `reca` package: engine/ -> reca.engine, kernels/ -> reca.kernels, models/ -> reca.models.

The folders keep the short names of the repository layout and hold no `__init__.py`: the
package `__init__`s live in src/reca/ (why: `reca._folder`). Only `reca.*` is installed, so no
top-level `engine`, `kernels` or `models` module can shadow a user's own folders or an installed
package of that name (Hugging Face's `kernels`, which transformers imports).

- wheel (`pip install .`): `build_py` below puts each folder's modules beside the `__init__`
  from src/reca/<name>/, so the installed tree is one ordinary package;
- editable (`pip install -e .`) and `PYTHONPATH=src`: src/reca/<name>/__init__.py extends its
  `__path__` to the folder, so edits take effect without a reinstall.
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

FOLDERS = {"reca.engine": "engine", "reca.kernels": "kernels", "reca.models": "models"}
PACKAGES = {"reca": "src/reca", **{name: f"src/reca/{folder}" for name, folder in FOLDERS.items()}}
# every subpackage (engine/data/, models/harmon/, kernels/condition/, ...) under its reca.* name
for name, folder in FOLDERS.items():
    for sub in find_packages(folder):
        PACKAGES[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
DATA = {"reca.engine.prompts": ["*.txt"], "reca.models.showo": ["*.pt"]}


class BuildPy(build_py):
    """The wheel's reca.engine / reca.kernels / reca.models: the `__init__` from src/reca/<name>/
    and the modules of the top-level folder <name>/ (its subfolders are packages of their own)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package in FOLDERS:
            for path in sorted(glob.glob(os.path.join(FOLDERS[package], "*.py"))):
                modules.append((package, os.path.splitext(os.path.basename(path))[0], path))
        return modules


setup(
    name="reca",
    version="0.1.0",
    description="Performance-first RecA (Reconstruction Alignment) post-training engine for unified multimodal models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data=DATA,
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.11",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "scikit-image",  # the embedded demo photographs (skimage.data)
        "triton>=3.2; platform_system == 'Linux'",  # the fused kernels (CPU: Triton's interpreter)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "parquet": ["pyarrow"],  # Parquet data sources (imported lazily)
        "test": ["pytest", "pytest-benchmark", "pyarrow"],
        "bench": ["pytest-benchmark", "liger-kernel"],
        "tensorboard": ["tensorboard"],
        "openuni": ["diffusers>=0.42"],  # SANA and DC-AE of the openuni family (imported lazily); tested 0.42.1
    },
    entry_points={"console_scripts": ["reca = reca.engine.cli:main"]},
)
