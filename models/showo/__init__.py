"""Show-o (AR over discrete image codes): Phi-1.5 + MAGVIT-v2 + CLIP visual prompt (models/showo/model.py)."""
from reca.models.showo.codec import CodecConfig
from reca.models.showo.model import ClipShape, PhiShape, ShowoConfig, ShowoModel

__all__ = ["ClipShape", "CodecConfig", "PhiShape", "ShowoConfig", "ShowoModel"]
