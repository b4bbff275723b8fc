"""Model families behind one adapter protocol (`reca.models.adapter.RecaAdapter`).

Models are single-device and kernel-agnostic: each takes a `KernelOps` table (chosen by the
run's `kernels.backend`) and never patches anything. `FAMILIES` maps a config's `family` field
to its `Family`: the config class and the model class, imported on first use, so importing
this package imports no family (and no transformers): a run imports the one it builds.
"""

from __future__ import annotations

from reca import _folder

__path__ += _folder("models")  # the modules of models/ (see reca._folder)

import importlib
import sys
from typing import Any, Callable

from reca.models.adapter import (CaptionBatch, LossOutput, PromptBatch, PromptTemplate, RecaAdapter, ReconBatch,
                                 SampleBatch, TextTokenizer, ViewSpec)
from reca.models.base import Conditioning, RecaModule

# Any registered family's config dataclass (a keyword-only dataclass whose `family` field names it).
ModelConfig = Any


class Family:
    """A model family: `config` (its config dataclass) and `build` ((config, ops) -> the model,
    an nn.Module implementing the adapter protocol). Built-in families name them as
    "module:attribute" and are imported on first use; a registered one holds them.
    `module`: the module that defines the family (that called `register_family`), which a run's
    config.json records (`code.modules`) so that reading the run back imports it again."""

    def __init__(self, config: type | str, build: Callable | str, module: str = ""):
        self._config, self._build = config, build
        self.module = module or (config.partition(":")[0] if isinstance(config, str) else config.__module__)

    @staticmethod
    def _resolve(ref):
        if not isinstance(ref, str):
            return ref
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def config(self) -> type:
        self._config = self._resolve(self._config)
        return self._config

    @property
    def build(self) -> Callable:
        self._build = self._resolve(self._build)
        return self._build

    @property
    def builtin(self) -> bool:
        """One of reca's own families (nothing to record in a run's config)."""
        return self.module.startswith("reca.models.")


FAMILIES: dict[str, Family] = {
    "flow": Family("reca.models.flow.model:FlowConfig", "reca.models.flow.model:FlowModel"),
    "harmon": Family("reca.models.harmon.model:HarmonConfig", "reca.models.harmon.model:HarmonModel"),
    "bagel": Family("reca.models.bagel.model:BagelConfig", "reca.models.bagel.model:BagelModel"),
    "openuni": Family("reca.models.openuni.model:OpenUniConfig", "reca.models.openuni.model:OpenUniModel"),
    "showo": Family("reca.models.showo.model:ShowoConfig", "reca.models.showo.model:ShowoModel"),
    "janus": Family("reca.models.janus.model:JanusConfig", "reca.models.janus.model:JanusModel"),
}


def register_family(name: str, config: type, build: Callable) -> None:
    """Make a family known by name: `config` a dataclass with a `family` field (its default,
    `name`), `build(config, ops)` an nn.Module implementing the adapter protocol. Another
    repository plugs its model into `reca.train` / `reca train` with this (README).

    The module that calls this is recorded in every run of the family (config.json's
    `code.modules`) and imported when the run is read back (`reca train --resume`, `reca
    sample`, `reca export`): call it at the top level of an importable module, not inside a
    function or a script run as `__main__`."""
    caller = sys._getframe(1).f_globals.get("__name__", "") or config.__module__
    FAMILIES[name] = Family(config, build, module=caller)


def build_model(cfg, ops=None):
    """Instantiate the family named by `cfg.family` (on the current default device)."""
    return FAMILIES[cfg.family].build(cfg, ops)


# The built-in families' classes by name, imported on first access (`from reca.models import FlowConfig`).
_LAZY = {"FlowConfig": "flow", "FlowModel": "flow", "HarmonConfig": "harmon", "HarmonModel": "harmon",
         "BagelConfig": "bagel", "BagelModel": "bagel", "OpenUniConfig": "openuni", "OpenUniModel": "openuni",
         "ShowoConfig": "showo", "ShowoModel": "showo", "JanusConfig": "janus", "JanusModel": "janus"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"reca.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'reca.models' has no attribute {name!r}")


__all__ = [
    "FAMILIES", "Family", "ModelConfig", "build_model", "register_family", "RecaModule", "Conditioning",
    "ReconBatch", "CaptionBatch", "SampleBatch", "RecaAdapter", "ViewSpec",
    "PromptTemplate", "PromptBatch", "LossOutput", "TextTokenizer", *_LAZY,
]
