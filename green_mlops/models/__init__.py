"""Embedded models (``digits`` here, ``reviews`` built into the cache) and their build scripts.

The registry itself lives with the model contract in :mod:`targets.model.registry`; these names are
re-exported for the callers that import them from here.
"""
from __future__ import annotations

from targets.model.registry import DEFAULT_MODEL, EMBEDDED, EMBEDDED_DIR, model_home, models_cache, resolve_model

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "EMBEDDED_DIR", "model_home", "models_cache", "resolve_model"]
