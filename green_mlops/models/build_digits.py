"""Build the embedded default model ``digits``: an early-exit ResNet-style CNN.

Data: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits, no download).
Split (fixed seed, stratified): half of the images are held out for evaluation and never seen in
training; the other half is split into training and a validation set that picks the controller's
recommended threshold. Held-out images that are pixel-identical to a training or validation
image are dropped, so no test image is seen in training even as a duplicate.

Outputs, in the model directory contract of :mod:`targets.model_dir`:
``full.onnx`` (x -> logits), ``stage1.onnx`` (x -> exit_logits, hidden),
``stage2.onnx`` (hidden -> logits), ``eval.npz`` (held-out x, y), ``model.json``.

Needs the ``models`` extra (torch, onnx, scikit-learn); torch is never a runtime dependency.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

SEED = 0
TEST_FRACTION = 0.5
VAL_FRACTION_OF_REST = 0.2
EPOCHS = 40
BATCH_SIZE = 64
EXIT_LOSS_WEIGHT = 0.5
STEM_CHANNELS = 32
WIDE_CHANNELS = 144
UPSAMPLE = 2  # the CNN works at 16x16: inference, not call overhead, dominates latency
OPSET = 17
# Accuracy the controller's recommended threshold may give up on the validation split.
CALIBRATION_MAX_EXTRA_ERRORS = 0


def _split(n_samples: int, labels: np.ndarray, images: np.ndarray):
    from sklearn.model_selection import train_test_split

    indices = np.arange(n_samples)
    rest, test = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    train, val = train_test_split(
        rest, test_size=VAL_FRACTION_OF_REST, stratify=labels[rest], random_state=SEED
    )
    seen = {images[i].tobytes() for i in np.concatenate([train, val])}
    duplicates = np.array([images[i].tobytes() in seen for i in test])
    return np.sort(train), np.sort(val), np.sort(test[~duplicates]), int(duplicates.sum())


def _networks(torch):
    nn = torch.nn

    class ResidualBlock(nn.Module):
        def __init__(self, in_ch: int, out_ch: int):
            super().__init__()
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_ch)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_ch)
            self.shortcut = (
                nn.Identity()
                if in_ch == out_ch
                else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    class Stage1(nn.Module):
        """Stem + first residual block, with a small exit head (2x2 average pool + linear)."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Upsample(scale_factor=UPSAMPLE, mode="bilinear", align_corners=False),
                nn.Conv2d(1, STEM_CHANNELS, 3, padding=1, bias=False),
                nn.BatchNorm2d(STEM_CHANNELS),
                nn.ReLU(),
            )
            self.block = ResidualBlock(STEM_CHANNELS, STEM_CHANNELS)
            self.exit_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(STEM_CHANNELS * 4, 10)
            )

        def forward(self, x):
            hidden = self.block(self.stem(x))
            return self.exit_head(hidden), hidden

    class Stage2(nn.Module):
        """The remaining residual blocks and the classifier."""

        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(
                ResidualBlock(STEM_CHANNELS, WIDE_CHANNELS),
                ResidualBlock(WIDE_CHANNELS, WIDE_CHANNELS),
                ResidualBlock(WIDE_CHANNELS, WIDE_CHANNELS),
            )
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDE_CHANNELS, 10)
            )

        def forward(self, hidden):
            return self.head(self.blocks(hidden))

    class Full(nn.Module):
        def __init__(self, stage1, stage2):
            super().__init__()
            self.stage1, self.stage2 = stage1, stage2

        def forward(self, x):
            return self.stage2(self.stage1(x)[1])

    return Stage1, Stage2, Full


def _augment(torch, batch):
    """Random shifts of up to one pixel (zero padded): the digits are not centred identically."""
    padded = torch.nn.functional.pad(batch, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,)).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def _train(torch, full, x_train, y_train, epochs, log):
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.AdamW(full.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=epochs * ((len(x_train) + BATCH_SIZE - 1) // BATCH_SIZE)
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        full.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            xb, yb = _augment(torch, x_train[idx]), y_train[idx]
            exit_logits, hidden = full.stage1(xb)
            loss = loss_fn(full.stage2(hidden), yb) + EXIT_LOSS_WEIGHT * loss_fn(exit_logits, yb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            log(f"  epoch {epoch + 1}/{epochs}  loss {total / len(order):.4f}")


def _normalised_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / np.log(p.shape[1])


def _calibrate(exit_logits: np.ndarray, full_logits: np.ndarray, labels: np.ndarray) -> float:
    """Largest uncertainty cut-off below which exiting early adds no error on validation data."""
    u = _normalised_entropy(exit_logits)
    exit_ok = exit_logits.argmax(1) == labels
    full_ok = full_logits.argmax(1) == labels
    best = 0.0
    for cut in np.unique(u):
        skipped = u <= cut
        # Errors the exit adds where the full model was right; gains elsewhere do not offset them.
        if int((full_ok & ~exit_ok & skipped).sum()) <= CALIBRATION_MAX_EXTRA_ERRORS:
            best = float(cut)
        else:
            break
    return best


def _export(torch, module, example, path: Path, input_names, output_names) -> None:
    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def build(out_dir: Path, log=print, epochs: int = EPOCHS) -> dict:
    """Train, export and describe the ``digits`` model in ``out_dir``; returns its model.json.

    ``epochs`` below the default gives a quick, less accurate model (tests use it).
    """
    try:
        import torch
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise SystemExit(
            f"building models needs the 'models' extra ({exc.name} is missing): "
            "pip install torch==2.13.0 -e '.[models]'"
        ) from exc

    started = time.perf_counter()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train, val, test, dropped = _split(len(labels), labels, images)
    log(f"split: {len(train)} train, {len(val)} validation, {len(test)} held out "
        f"({dropped} held-out duplicates of training images dropped)")

    Stage1, Stage2, Full = _networks(torch)
    stage1, stage2 = Stage1(), Stage2()
    full = Full(stage1, stage2)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    _train(torch, full, x_all[train], y_all[train], epochs, log)
    full.eval()

    with torch.no_grad():
        def logits_of(idx):
            exit_logits, hidden = stage1(x_all[idx])
            return exit_logits.numpy(), stage2(hidden).numpy()

        val_exit, val_full = logits_of(val)
        test_exit, test_full = logits_of(test)

    accuracy = {
        "validation_full": float((val_full.argmax(1) == labels[val]).mean()),
        "validation_exit": float((val_exit.argmax(1) == labels[val]).mean()),
        "heldout_full": float((test_full.argmax(1) == labels[test]).mean()),
        "heldout_exit": float((test_exit.argmax(1) == labels[test]).mean()),
    }
    skip_below_u = _calibrate(val_exit, val_full, labels[val])
    log("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    log(f"calibrated on validation: exit when normalised entropy <= {skip_below_u:.4f}")

    example = x_all[test[:1]]
    with torch.no_grad():
        hidden_example = stage1(example)[1]
    _export(torch, full, example, out_dir / "full.onnx", ["x"], ["logits"])
    _export(torch, stage1, example, out_dir / "stage1.onnx", ["x"], ["exit_logits", "hidden"])
    _export(torch, stage2, hidden_example, out_dir / "stage2.onnx", ["hidden"], ["logits"])
    np.savez_compressed(
        out_dir / "eval.npz", x=images[test], y=labels[test], source_index=test.astype(np.int32)
    )

    meta = {
        "name": "digits",
        "task": "image-classification",
        "classes": [str(c) for c in range(10)],
        "outputs_are": "logits",
        "input": {"name": "x", "dtype": "float32", "shape": [-1, 1, 8, 8],
                  "description": "8x8 grey image, pixel value / 16, in [0, 1]"},
        "full": {"file": "full.onnx", "inputs": ["x"], "outputs": ["logits"]},
        "stage1": {"file": "stage1.onnx", "inputs": ["x"], "outputs": ["exit_logits", "hidden"]},
        "stage2": {"file": "stage2.onnx", "inputs": ["hidden"], "outputs": ["logits"]},
        "eval": {"file": "eval.npz", "n": int(len(test))},
        "controller": {"uncertainty_skip_below": round(skip_below_u, 6)},
        "build": {
            "source": "sklearn.datasets.load_digits",
            "seed": SEED,
            "split": {"train": int(len(train)), "validation": int(len(val)),
                      "heldout": int(len(test)), "heldout_duplicates_dropped": dropped},
            "epochs": epochs,
            "accuracy": accuracy,
            "torch": torch.__version__,
            "opset": OPSET,
            "duration_s": round(time.perf_counter() - started, 1),
        },
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built digits in {meta['build']['duration_s']} s -> {out_dir}")
    return meta
