"""The model registry: names a user can pass as ``--model``, and where their directories are.

``digits`` ships inside the package (``green_mlops/models/digits``); ``reviews`` is built into the
models cache. Anything else is a model directory path. Every model loads through
:func:`targets.model.model_dir.load_model_dir`, so it is validated once, at load, the same way for
``validate``, ``serve``, the locustfiles and ``triton repo``.
"""
from __future__ import annotations

import os
from pathlib import Path

from targets.errors import ModelDirError
from targets.model.model_dir import ModelSpec, load_model_dir

# The package data directory of the embedded models (a sibling package of ``targets``).
EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "green_mlops" / "models"
DEFAULT_MODEL = "digits"
EMBEDDED = ("digits", "reviews")


def models_cache() -> Path:
    """Where models too large for git are built: $GREEN_MLOPS_MODELS or ~/.cache/green-mlops/models."""
    return Path(os.environ.get("GREEN_MLOPS_MODELS", Path.home() / ".cache" / "green-mlops" / "models"))


def model_home(name: str) -> Path:
    """Where the named model lives: ``digits`` inside the package, ``reviews`` in the cache."""
    return EMBEDDED_DIR / "digits" if name == "digits" else models_cache() / name


def resolve_model(name_or_dir: str) -> ModelSpec:
    """An embedded model by name, or any model directory by path, validated (ModelDirError)."""
    if name_or_dir in EMBEDDED:
        path = model_home(name_or_dir)
        if not (path / "model.json").is_file():
            raise ModelDirError(f"embedded model '{name_or_dir}' is not built: run "
                                f"'green-mlops models build {name_or_dir}'")
        return load_model_dir(path)
    path = Path(name_or_dir)
    if not path.exists():
        raise ModelDirError(f"no model '{name_or_dir}': not an embedded model "
                            f"({', '.join(EMBEDDED)}) and no such directory")
    return load_model_dir(path)
