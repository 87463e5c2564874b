"""Tokenisation at the edge: text in, the model's int64 token ids out, for text models whose
``model.json`` names a ``tokenizer`` (a Hugging Face ``tokenizer.json``, run by ``tokenizers``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from targets.errors import InputError, ModelDirError


class EdgeTokenizer:
    """Pads and truncates every text to ``max_length`` ids (padding id ``pad_id``)."""

    def __init__(self, path: Path, max_length: int, pad_id: int = 0):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ModelDirError("text models need the 'tokenizers' package: pip install tokenizers") from exc
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for unreadable files
            raise ModelDirError(f"cannot load tokenizer {path}: {exc}") from exc
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.enable_padding(length=max_length, pad_id=pad_id)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text input must be a non-empty list of strings")
        return np.array([e.ids for e in self._tokenizer.encode_batch(texts)], dtype=np.int64)
