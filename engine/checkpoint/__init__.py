"""Checkpoints: one atomic file per run on one device (`single`)."""
from reca.engine.checkpoint.single import (CHECKPOINT, atomic_save, load_checkpoint, load_trainable, rng_state,
                                           save_checkpoint, set_rng_state, trainable_state)

__all__ = ["CHECKPOINT", "atomic_save", "load_checkpoint", "load_trainable", "rng_state", "save_checkpoint",
           "set_rng_state", "trainable_state"]
