"""Runtime: load an engine directory and run it."""
from .engine import Engine, PrefillResult, load_engine
from .manifest import EngineFormatError

__all__ = ["Engine", "EngineFormatError", "PrefillResult", "load_engine"]
