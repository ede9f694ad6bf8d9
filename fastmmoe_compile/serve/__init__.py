"""`fastmmoe-compile serve ENGINE_DIR`: an OpenAI-compatible server with continuous batching.

Layout: protocol.py (request bodies -> Job), media.py (images: data URLs, allowed local files,
optional http(s) fetch, size and pixel limits), engine_io.py (a Job -> the backbone's inputs),
scheduler.py (one thread owns the engine: continuous batching), app.py (Starlette routes, SSE),
metrics.py (Prometheus). The HTTP libraries are the `serve` extra: missing_dependencies() says
what to install.
"""
from __future__ import annotations

import importlib.util

REQUIRED = {"starlette": "starlette", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
INSTALL = "pip install 'fastmmoe-compile[serve]'"


def missing_dependencies() -> list[str]:
    """The serve extra's distributions that are not installed."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]
