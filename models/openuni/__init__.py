"""OpenUni (frozen InternVL3 + learnable queries + connector + SANA DiT on DC-AE latents):
`model` (the adapter), `connector` (OpenUni's ConnectorEncoder), `weights` (checkpoint layouts).
diffusers is imported only when a model is built (the `openuni` extra)."""
from reca.models.openuni.model import DCAEShape, InternViTShape, OpenUniConfig, OpenUniModel, SanaShape
from reca.models.openuni.connector import ConnectorShape

__all__ = ["OpenUniConfig", "OpenUniModel", "InternViTShape", "SanaShape", "DCAEShape", "ConnectorShape"]
