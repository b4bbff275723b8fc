"""Installs the `reca` package: engine/ -> reca.engine, kernels/ -> reca.kernels, models/ -> reca.models.

The folders keep the short names of the repository layout; only `reca.*` is installed, so
no top-level `engine`, `kernels` or `models` module can shadow a user's own folders.
"""
from setuptools import find_packages, setup

ROOTS = {"reca": "reca", "reca.engine": "engine", "reca.kernels": "kernels", "reca.models": "models"}
# every subpackage (engine/data/, models/harmon/, kernels/condition/, ...) under its reca.* name
PACKAGES = dict(ROOTS)
for name, folder in list(ROOTS.items())[1:]:
    for sub in find_packages(folder):
        PACKAGES[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    name="reca",
    version="0.1.0",
    description="Performance-first RecA (Reconstruction Alignment) post-training engine for unified multimodal models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"reca.engine": ["prompts/*.txt"], "reca.models.showo": ["*.pt"]},
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
