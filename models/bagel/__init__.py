"""BAGEL (Mixture-of-Transformers) family: `model.py` (the adapter), `mot.py` (the MoT LLM),
`siglip.py` (the NaViT encoder), `pack.py` (packed sequences and their mask), `weights.py`
(BAGEL-7B-MoT's released layout in and out)."""
from reca.models.bagel.model import BagelConfig, BagelModel
from reca.models.bagel.siglip import VitShape

__all__ = ["BagelConfig", "BagelModel", "VitShape"]
