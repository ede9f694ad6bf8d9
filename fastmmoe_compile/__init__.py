"""fastmmoe-compile: FastMMoE (arXiv 2511.17885) as compiler passes over exported MoE backbones.

    load (models/) -> export/ -> passes/ -> lower/ -> engine dir -> runtime/
"""
__version__ = "0.1.0"

from .config import ConfigError, FastMMoEConfig, FastVConfig, SparseVLMConfig, config_preset  # noqa: E402
from .runtime import Engine, EngineFormatError, EngineInputError, PrefillResult, load_engine  # noqa: E402


def compile_model(*args, **kwargs):
    """See fastmmoe_compile.api.compile_model (imported lazily: it pulls in transformers)."""
    from .api import compile_model as _compile_model

    return _compile_model(*args, **kwargs)


__all__ = [
    "ConfigError", "Engine", "EngineFormatError", "EngineInputError", "FastMMoEConfig", "FastVConfig", "PrefillResult",
    "SparseVLMConfig", "config_preset",
    "compile_model", "load_engine",
]
