"""reca: a performance-first engine for RecA (Reconstruction Alignment) post-training.

    import reca
    cfg = reca.preset("tiny")              # a RunConfig
    reca.train(cfg)                        # or: reca train --preset tiny

Subpackages: `reca.engine` (loop, data, checkpoints, CLI), `reca.models` (adapter protocol and
model families), `reca.kernels` (fused ops with their torch references). Importing `reca` does
nothing but bind these names: no device probes, seeds or compiler flags.
"""
import os

__version__ = "0.1.0"

__all__ = ["preset", "train", "RunConfig", "RecaAdapter", "__version__"]


def _folder(name: str) -> list[str]:
    """Where a checkout keeps subpackage `name`'s modules: its top-level folder (engine/,
    kernels/, models/), for the `__path__` of `src/reca/<name>/__init__.py`; [] elsewhere.

    Why the split: a folder holding an `__init__.py` at the checkout root would be a top-level
    package to any Python started there (`python -c`, `python -m` put the working directory
    first on sys.path), so `kernels/` would hide Hugging Face's `kernels` package that
    transformers imports, and a `reca/` folder would hide an installed reca. So the top-level
    folders hold no `__init__.py` (a folder without one is a namespace portion, which loses to
    any regular package of the same name wherever it lies on sys.path) and the package
    `__init__`s live here, under src/. An editable install or PYTHONPATH=src imports this file
    in place and the subpackages extend their `__path__` to the folders; a wheel (setup.py's
    build_py) copies each folder's modules beside its `__init__`, so there this returns []."""
    here = os.path.dirname(os.path.abspath(__file__))  # <checkout>/src/reca in a checkout
    root = os.path.dirname(os.path.dirname(here))
    folder = os.path.join(root, name)
    in_checkout = os.path.basename(os.path.dirname(here)) == "src" and os.path.isfile(os.path.join(root, "setup.py"))
    return [folder] if in_checkout and os.path.isdir(folder) else []


def __getattr__(name):  # lazy: `import reca` stays cheap and side-effect free
    if name == "preset":
        from reca.engine.presets import preset
        return preset
    if name == "train":
        from reca.engine.train import train
        return train
    if name == "RunConfig":
        from reca.engine.config import RunConfig
        return RunConfig
    if name == "RecaAdapter":
        from reca.models.adapter import RecaAdapter
        return RecaAdapter
    raise AttributeError(f"module 'reca' has no attribute {name!r}")
