"""The run-time half of each VLM family: prompt text, tiling, token expansion, encoder calls and
layout, keyed by the manifest's vision.family. The compile-time adapters (models/*.py) subclass
these, so both halves of a family share one definition; the runtime needs nothing from models."""
from .base import FRONT_ENDS, PLACEHOLDER, FrontEndFamily, chat_prompt, register
from . import internvl, deepseek_vl2, qwen3_vl_moe, glm4v_moe  # noqa: E402,F401  (registers them, in this order)

__all__ = ["FRONT_ENDS", "PLACEHOLDER", "FrontEndFamily", "chat_prompt", "register"]
