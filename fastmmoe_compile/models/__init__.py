"""Load: model-family adapters, presets, and the loader that turns a name into a model."""
from .base import MoEFamily
from .registry import FAMILIES, LoadedModel, UnsupportedModelError, family_for, load_model

__all__ = ["FAMILIES", "LoadedModel", "MoEFamily", "UnsupportedModelError", "family_for", "load_model"]
