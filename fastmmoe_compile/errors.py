"""The package's error classes for bad input: what a user typed, or the model and files it names.

Every one is a UserInputError, a ValueError (so `except ValueError` and `pytest.raises(ValueError)`
keep holding). The CLI turns a UserInputError into one line and exit code 2; any other exception
is a bug and keeps its traceback. Classes that were NotImplementedError before they had a class of
their own are NotImplementedError too. This module is the bottom layer: it imports nothing.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """Bad input: a flag, argument, model, checkpoint or engine directory the user named."""


class ConfigError(UserInputError):
    """A FastMMoEConfig value is out of range or does not fit the model (a merge layer without a
    router, a Kv above the model's top-k)."""


class UnknownModelError(UserInputError):
    """A model name that is neither a preset, a checkpoint directory nor a hub id (with a
    did-you-mean suggestion where a preset is close)."""


class ShapeOnlyModelError(UserInputError):
    """A shape-only (meta-device, weightless) preset where weights are needed: compiling an engine."""


class UnsupportedModelError(UserInputError, NotImplementedError):
    """A model this compiler cannot handle: not a routed-MoE family it knows, an experts or
    attention layout it does not rewrite, a DeepSeek-VL2 config or checkpoint outside the official
    layout, a transformers release it was not tested with, or what a backend cannot translate
    (e.g. ONNX: a weights dtype, complex-valued rotary embeddings)."""
