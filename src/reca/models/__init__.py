"""Model families behind one adapter protocol (`reca.models.adapter.RecaAdapter`).

Models are single-device and kernel-agnostic: each takes a `KernelOps` table (chosen by the
run's `kernels.backend`) and never patches anything. `FAMILIES` maps a config's `family` field
to its config class and its model class.
"""

from __future__ import annotations

from reca import _folder

__path__ += _folder("models")  # the modules of models/ (see reca._folder)

from dataclasses import dataclass
from typing import Callable, Union

from reca.models.adapter import (CaptionBatch, LossOutput, PromptBatch, PromptTemplate, RecaAdapter, ReconBatch,
                                 SampleBatch, TextTokenizer, ViewSpec)
from reca.models.base import Conditioning, RecaModule
from reca.models.bagel import BagelConfig, BagelModel
from reca.models.flow import FlowConfig, FlowModel
from reca.models.harmon import HarmonConfig, HarmonModel
from reca.models.janus import JanusConfig, JanusModel
from reca.models.openuni import OpenUniConfig, OpenUniModel
from reca.models.showo import ShowoConfig, ShowoModel


@dataclass(frozen=True)
class Family:
    config: type
    build: Callable  # (config, ops) -> nn.Module implementing RecaAdapter


FAMILIES: dict[str, Family] = {
    "flow": Family(FlowConfig, FlowModel),
    "harmon": Family(HarmonConfig, HarmonModel),
    "bagel": Family(BagelConfig, BagelModel),
    "openuni": Family(OpenUniConfig, OpenUniModel),
    "showo": Family(ShowoConfig, ShowoModel),
    "janus": Family(JanusConfig, JanusModel),
}

ModelConfig = Union[FlowConfig, HarmonConfig, BagelConfig, OpenUniConfig, ShowoConfig, JanusConfig]


def register_family(name: str, config: type, build: Callable) -> None:
    """Make a family known by name: `config` a dataclass with a `family` field (its default,
    `name`), `build(config, ops)` an nn.Module implementing the adapter protocol. Another
    repository plugs its model into `reca.train` / `reca train` with this (README)."""
    FAMILIES[name] = Family(config, build)


def build_model(cfg, ops=None):
    """Instantiate the family named by `cfg.family` (on the current default device)."""
    return FAMILIES[cfg.family].build(cfg, ops)


__all__ = [
    "FAMILIES", "Family", "ModelConfig", "build_model", "register_family", "RecaModule", "Conditioning",
    "ReconBatch", "CaptionBatch", "SampleBatch", "RecaAdapter", "ViewSpec",
    "PromptTemplate", "PromptBatch", "LossOutput", "TextTokenizer", "FlowConfig", "FlowModel",
    "HarmonConfig", "HarmonModel", "OpenUniConfig", "OpenUniModel", "JanusConfig", "JanusModel",
]
