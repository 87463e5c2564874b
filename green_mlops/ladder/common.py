"""What every ``ladder build`` shares: reading the user's labelled data (CSV, JSON lines, Parquet),
mapping its labels onto the classifier's classes, the seeded split, the row count the default
budget needs, and progress with time left. Every problem is a :class:`LadderBuildError`: one line
for the user, exit 2."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from targets.control.certify import rows_needed
from targets.errors import GreenMLOpsError

HELDOUT_FRACTION = 0.2  # drawn first, by the split seed
VALIDATION_FRACTION_OF_REST = 0.30  # as the reviews build: the budget's certificate is calibrated on it
DEFAULT_BUDGET_PP, DEFAULT_RISK = 0.5, 0.1  # the budget policy's defaults (targets.control.controller_config)
HEAD_STEPS = 400  # full-batch Adam steps per exit head (frozen backbone)
HEAD_LR = 0.01
DISTILL_ALPHA = 0.5  # share of an exit head's loss that is distillation from the full model
DISTILL_TEMPERATURE = 2.0


class LadderBuildError(GreenMLOpsError):
    """A checkpoint, data file or option ``ladder build`` cannot use; the message is the whole story."""


def read_table(path: Path, text_column: str, label_column: str) -> tuple[list[str], list]:
    """``(texts, raw labels)`` from a CSV (or TSV), JSON lines or Parquet file, by column name."""
    path = Path(path)
    if not path.is_file():
        raise LadderBuildError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                columns = reader.fieldnames or []
                rows = list(reader)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise LadderBuildError(f"{path}: every line must be a JSON object")
            columns = sorted({key for row in rows for key in row})
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise LadderBuildError("reading Parquet needs pyarrow: pip install pyarrow (or give CSV / JSON lines)") from exc
            table = pq.read_table(path)
            columns = table.column_names
            rows = table.to_pylist()
        else:
            raise LadderBuildError(f"{path}: unknown data format '{suffix}': give .csv, .tsv, .jsonl or .parquet")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError) as exc:
        raise LadderBuildError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise LadderBuildError(f"{path} has no column {', '.join(repr(c) for c in missing)}; its columns: "
                               f"{', '.join(map(repr, columns)) or 'none'} (set --text-column / --label-column)")
    texts, labels = [], []
    for number, row in enumerate(rows, start=2 if suffix in (".csv", ".tsv") else 1):
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip() or label is None or label == "":
            raise LadderBuildError(f"{path}: row {number} has no text or no label in {text_column!r} / {label_column!r}")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise LadderBuildError(f"{path} holds no rows")
    return texts, labels


def map_labels(raw: list, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class indices for ``raw`` labels and the class names. With ``classes`` (a classifier's own,
    in output order), a label is a class name or an index into them; any other value is an error
    naming the classes. Without (a bare encoder), the classes are the labels' distinct values,
    sorted (as numbers when all are integers)."""
    def as_int(value):
        try:
            number = int(str(value).strip())
        except ValueError:
            return None
        return number if str(number) == str(value).strip() else None

    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        y, unknown = [], set()
        for value in raw:
            i = index.get(str(value))
            if i is None:
                number = as_int(value)
                i = number if number is not None and 0 <= number < len(classes) else None
            if i is None:
                unknown.add(str(value))
            y.append(-1 if i is None else i)
        if unknown:
            shown = ", ".join(sorted(unknown)[:5]) + (" …" if len(unknown) > 5 else "")
            raise LadderBuildError(f"the label column has values the classifier's head does not have ({shown}); its "
                                   f"{len(classes)} classes: {', '.join(classes)} (as names or indices 0 … {len(classes) - 1})")
        return np.array(y, dtype=np.int64), list(classes)
    values = sorted({str(v) for v in raw}, key=lambda v: (as_int(v) is None, as_int(v) or 0, v))
    if len(values) < 2:
        raise LadderBuildError(f"the label column holds one class only ({values[0]}): a classifier needs two or more")
    index = {v: i for i, v in enumerate(values)}
    return np.array([index[str(v)] for v in raw], dtype=np.int64), values


def split_rows(labels: np.ndarray, split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, validation, held-out)`` row indices, stratified, drawn by ``split_seed``: 20 %
    held out first, then of the rest 30 % validation (the budget's calibration), 70 % training."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    if (counts[counts > 0] < 5).any():
        rare = [str(i) for i, c in enumerate(counts) if 0 < c < 5]
        raise LadderBuildError(f"class(es) {', '.join(rare)} have fewer than 5 rows: a stratified train / validation / "
                               "held-out split needs at least 5 of each")
    rest, test = train_test_split(indices, test_size=HELDOUT_FRACTION, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=VALIDATION_FRACTION_OF_REST, stratify=labels[rest],
                                  random_state=split_seed)
    return np.sort(train), np.sort(val), np.sort(test)


def rows_for_default_budget() -> tuple[int, int]:
    """``(validation rows, labelled rows)`` the default budget needs: the fewest that can certify
    0.5 pp at δ = 0.1, and the data set size whose split gives that many."""
    validation = rows_needed(DEFAULT_BUDGET_PP / 100, DEFAULT_RISK)
    return validation, math.ceil(validation / ((1 - HELDOUT_FRACTION) * VALIDATION_FRACTION_OF_REST)) + 1


def require_rows(n_rows: int, allow_small: bool) -> None:
    """Too few rows for the default budget's certificate: an error before any work (unless the
    user accepts a model the default budget cannot certify, ``allow_small``)."""
    validation, total = rows_for_default_budget()
    have = int(n_rows * (1 - HELDOUT_FRACTION) * VALIDATION_FRACTION_OF_REST)
    if have < validation and not allow_small:
        raise LadderBuildError(
            f"{n_rows:,} labelled rows give about {have:,} validation rows; certifying the default budget "
            f"({DEFAULT_BUDGET_PP:g} pp at δ = {DEFAULT_RISK:g}) needs {validation:,}, so at least {total:,} labelled "
            "rows (or --allow-small: validate then falls back to the paper's policy, uncertified)")


def fit_head(torch, linear, features: np.ndarray, labels: np.ndarray, teacher: np.ndarray | None) -> None:
    """Train one linear head on pooled features: cross-entropy, mixed with distillation from
    ``teacher`` logits when given; full-batch Adam, seeded."""
    functional = torch.nn.functional
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    target = None if teacher is None else functional.softmax(torch.from_numpy(teacher) / DISTILL_TEMPERATURE, dim=-1)
    optimiser = torch.optim.Adam(linear.parameters(), lr=HEAD_LR, weight_decay=1e-4)
    for _ in range(HEAD_STEPS):
        logits = linear(x)
        loss = functional.cross_entropy(logits, y)
        if target is not None:
            distill = functional.kl_div(functional.log_softmax(logits / DISTILL_TEMPERATURE, dim=-1), target,
                                        reduction="batchmean") * DISTILL_TEMPERATURE ** 2
            loss = (1 - DISTILL_ALPHA) * loss + DISTILL_ALPHA * distill
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def model_name(name: str | None, source: Path) -> str:
    """The model's name on the server: ``name``, or the output directory's name made URL-safe."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(source).resolve().stem).strip("-.")[:100] or "model"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise LadderBuildError(f"model name '{name}' must be letters, digits, '_', '.', '-' (it is a URL segment)")
    return name


def replace_dir(building: Path, out_dir: Path) -> None:
    """Swap a finished build into place, so a crash never leaves a half-written model."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    building.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(out_dir: Path):
    """A sibling directory to write a model into; swapped in as ``out_dir`` only when the block
    completes, removed whatever happens."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        yield building
        replace_dir(building, out_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)


class Progress:
    """Log lines with the share done and the time left, at most every ``every_s`` seconds."""

    def __init__(self, log, what: str, total: int, every_s: float = 5.0):
        self.log, self.what, self.total, self.every_s = log, what, max(total, 1), every_s
        self.started = self.last = time.perf_counter()

    def step(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        left = elapsed / max(done, 1) * (self.total - done)
        self.log(f"  {self.what}: {done}/{self.total} ({100 * done / self.total:.0f} %), {elapsed:.0f} s, "
                 f"about {left:.0f} s left")
