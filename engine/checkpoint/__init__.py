"""Checkpoints: one atomic, checksummed file per run on one device (`single`, `integrity`), and
what a resume must not change (`guard`)."""
from reca.engine.checkpoint.guard import (fingerprint_conflict, frozen_fingerprint, refuse_conflicts,
                                          resume_conflicts)
from reca.engine.checkpoint.integrity import atomic_save, verified_load
from reca.engine.checkpoint.single import (CHECKPOINT, checkpoint_bytes, load_checkpoint, load_trainable, restore,
                                           rng_state, save_checkpoint, set_rng_state, tied_names, trainable_state)

__all__ = ["CHECKPOINT", "atomic_save", "checkpoint_bytes", "fingerprint_conflict", "frozen_fingerprint",
           "load_checkpoint", "load_trainable", "refuse_conflicts", "restore", "resume_conflicts", "rng_state",
           "save_checkpoint", "set_rng_state", "tied_names", "trainable_state", "verified_load"]
