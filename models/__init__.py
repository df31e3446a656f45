"""ViT_P / ViT_C model zoo (configs, registry, lazy torch modules, analytic complexity) and the contracts every stage
shares: checkpoint, bundle manifest, preprocessing, atomic I/O."""

from models.complexity import Complexity, complexity
from models.config import ConvLayer, ConvStem, PatchifyStem, ViTConfig
from models.registry import PAPER_VARIANTS, build_model, get_config, list_variants, register

__all__ = [
    "PAPER_VARIANTS",
    "Complexity",
    "ConvLayer",
    "ConvStem",
    "PatchifyStem",
    "ViTConfig",
    "build_model",
    "complexity",
    "get_config",
    "list_variants",
    "register",
]
