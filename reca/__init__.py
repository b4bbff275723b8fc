"""reca: a performance-first engine for RecA (Reconstruction Alignment) post-training.

    import reca
    cfg = reca.preset("tiny")              # a RunConfig
    reca.train(cfg)                        # or: reca train --preset tiny

Subpackages: `reca.engine` (loop, data, checkpoints, CLI), `reca.models` (adapter protocol and
model families), `reca.kernels` (fused ops with their torch references). Importing `reca` does
nothing but bind these names: no device probes, seeds or compiler flags.
"""
__version__ = "0.1.0"

__all__ = ["preset", "train", "RunConfig", "RecaAdapter", "__version__"]


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
