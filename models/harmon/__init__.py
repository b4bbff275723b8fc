"""Harmon (AR + MAR): `model` (the adapter), `mar` (masked autoregressive encoder/decoder),
`diffhead` (the AdaLN diffusion head and its DDPM loss), `weights` (Harmon's checkpoint layout)."""
from reca.models.harmon.model import HarmonConfig, HarmonModel

__all__ = ["HarmonConfig", "HarmonModel"]
