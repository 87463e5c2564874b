"""The reference answers of a run: for every evaluation row, the full model's answer, the exit
head's answer and its uncertainty under each measure, computed once, in-process, before the load.

The full model is deterministic, so each bio request is paired with what standard answers for the
same row (``full_predicted``); the reports draw the admission–accuracy curve from the exit
answers and uncertainties stored here, and never run a model themselves.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REFERENCE_FILE = "reference.json"
UNCERTAINTY_MEASURES = ("entropy", "least_confidence", "margin")
BATCH_ROWS = 256


def reference_answers(spec) -> dict:
    """Per evaluation row of ``spec`` (a resolved model): label, full and exit answers, exit u."""
    from targets.control.controller import uncertainty
    from targets.backends.ort_target import OnnxRuntimeTarget

    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, y = spec.load_eval()
    full, exit_p = [], []
    for start in range(0, len(x), BATCH_ROWS):
        chunk = backend.check(x[start : start + BATCH_ROWS])
        full.append(backend.full_probabilities(chunk).argmax(1))
        exit_p.append(backend.stage1(chunk)[0])
    exit_probabilities = np.concatenate(exit_p)
    return {
        "model": spec.name,
        "computed_with": backend.provider,
        "label": [int(v) for v in y],
        "full_predicted": [int(v) for v in np.concatenate(full)],
        "exit_predicted": [int(v) for v in exit_probabilities.argmax(1)],
        "exit_u": {m: [round(float(v), 6) for v in uncertainty(exit_probabilities, m)]
                   for m in UNCERTAINTY_MEASURES},
    }


def write_reference(results_dir: Path, reference: dict) -> Path:
    path = results_dir / REFERENCE_FILE
    path.write_text(json.dumps(reference, separators=(",", ":")) + "\n")
    return path
