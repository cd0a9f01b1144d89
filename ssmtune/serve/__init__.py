"""Serving many adapters side by side: continuous batching with per-row adapters, and an HTTP API.

``BatchEngine`` (``batching.py``) needs only torch; ``create_app`` (``app.py``) needs the ``serve`` extra
(``pip install ssmtune[serve]``: FastAPI, uvicorn, httpx). See docs/serving.md.
"""

from .batching import BatchEngine, EngineStats, GenerationRequest, GenerationSettings, QueueFullError

__all__ = ["BatchEngine", "EngineStats", "GenerationRequest", "GenerationSettings", "QueueFullError", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
