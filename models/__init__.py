"""ViT_P / ViT_C model zoo (configs, registry, lazy torch modules, analytic complexity) and the contracts every stage
shares: checkpoint, bundle manifest, preprocessing, atomic I/O."""

from models.loading import guard_loading

# First, before the modules below: a command's Ctrl-C, SIGTERM or hang-up while they load is its one line.
guard_loading()

# isort: split
from models.complexity import Complexity, complexity  # noqa: E402
from models.config import ConvLayer, ConvStem, PatchifyStem, ViTConfig  # noqa: E402
from models.registry import PAPER_VARIANTS, build_model, get_config, list_variants, register  # noqa: E402

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
