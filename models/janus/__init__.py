"""Janus-Pro (AR over VQ codes, decoupled understanding and generation encoders) on transformers'
own JanusForConditionalGeneration (models/janus/model.py)."""
from reca.models.janus.model import JanusConfig, JanusModel, JanusVisionShape, JanusVQShape, LlamaShape

__all__ = ["JanusConfig", "JanusModel", "JanusVisionShape", "JanusVQShape", "LlamaShape"]
