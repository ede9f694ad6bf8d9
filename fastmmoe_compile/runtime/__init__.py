"""Runtime: load an engine directory and run it."""
from .engine import Engine, PrefillResult, load_engine
from .inputs import EngineInputError
from .manifest import EngineFormatError

__all__ = ["Engine", "EngineFormatError", "EngineInputError", "PrefillResult", "load_engine"]
