"""Build the embedded default model ``digits``: a ResNet-style CNN with a ladder of early exits.

Data: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits, no download).
Split (stratified, drawn with the *split seed*, apart from the training seed): 30 % of the images (540) are held out for evaluation and never
seen in training; the rest is split into training (60 %, 754 images) and a validation set (40 %,
503 images) on which the controller's thresholds are calibrated: large enough for the budget
policy to certify a 0.5 pp accuracy budget at δ = 0.1, which needs at least ln(1/δ)/0.005 ≈ 460
rows. (A 35/45 split, 642 training images, lost 2 pp of held-out accuracy: training needs them.) Held-out images that are pixel-identical to a training or validation
image are dropped, so no test image is seen in training even as a duplicate. ``model.json`` →
``split`` records the split seed and the sha256 of the held-out rows' indices in ``load_digits``
(:func:`targets.model.model_dir.heldout_digest`); ``eval.npz`` and ``validation.npz`` carry those
indices as ``source_index``.

The network is four residual blocks; an exit head (2x2 average pool + linear) follows each of the
first three, so a request can leave after one, two or three blocks (a ladder of three exits). All
exits and the final classifier are trained jointly (a weighted sum of their losses).

Outputs, in the model directory contract of :mod:`targets.model.model_dir` (N = 4 stages):
``full.onnx`` (x -> logits), ``stage1.onnx`` (x -> exit_logits, hidden), ``stage2.onnx`` and
``stage3.onnx`` (hidden -> exit_logits, hidden), ``stage4.onnx`` (hidden -> logits),
``eval.npz`` (held-out x, y), ``validation.npz`` (validation x, y: the exit thresholds are
calibrated on it, in code, when the model loads), ``model.json``.

Needs the ``models`` extra (torch, onnx, scikit-learn); torch is never a runtime dependency.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from targets.model.model_dir import heldout_digest

TRAIN_SEED = 0  # weights' initialisation, batch order and augmentation
SPLIT_SEED = 20261202  # which images are held out, validation, training (`models build --split-seed`); the
# shipped model's split, drawn after the calibration rules were frozen (7ecec13); 0 before it
TEST_FRACTION = 0.30
VAL_FRACTION_OF_REST = 0.40  # about 500 rows: enough to certify a 0.5 pp budget at δ = 0.1
EPOCHS = 40
BATCH_SIZE = 64
EXIT_LOSS_WEIGHTS = (0.5, 0.5, 0.5)  # exits after blocks 1, 2 and 3; the final loss weighs 1
STEM_CHANNELS = 32
WIDE_CHANNELS = 144
UPSAMPLE = 2  # the CNN works at 16x16: inference, not call overhead, dominates latency
OPSET = 17


def _split(n_samples: int, labels: np.ndarray, images: np.ndarray, split_seed: int = SPLIT_SEED):
    from sklearn.model_selection import train_test_split

    indices = np.arange(n_samples)
    rest, test = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=labels, random_state=split_seed
    )
    train, val = train_test_split(
        rest, test_size=VAL_FRACTION_OF_REST, stratify=labels[rest], random_state=split_seed
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

    def exit_head(channels: int):
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels * 4, 10))

    class ExitStage(nn.Module):
        """One rung of the ladder: (stem +) a residual block, then an exit head beside it."""

        def __init__(self, in_ch: int, out_ch: int, stem: bool = False):
            # The stem (upsample + conv to STEM_CHANNELS) only in stage 1, whose input is the image.
            super().__init__()
            self.stem = nn.Sequential(
                nn.Upsample(scale_factor=UPSAMPLE, mode="bilinear", align_corners=False),
                nn.Conv2d(1, STEM_CHANNELS, 3, padding=1, bias=False),
                nn.BatchNorm2d(STEM_CHANNELS),
                nn.ReLU(),
            ) if stem else nn.Identity()
            self.block = ResidualBlock(STEM_CHANNELS if stem else in_ch, out_ch)
            self.exit_head = exit_head(out_ch)

        def forward(self, x):
            hidden = self.block(self.stem(x))
            return self.exit_head(hidden), hidden

    class FinalStage(nn.Module):
        """The last residual block and the classifier."""

        def __init__(self):
            super().__init__()
            self.block = ResidualBlock(WIDE_CHANNELS, WIDE_CHANNELS)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDE_CHANNELS, 10))

        def forward(self, hidden):
            return self.head(self.block(hidden))

    class Full(nn.Module):
        def __init__(self, stages):
            super().__init__()
            self.stages = nn.ModuleList(stages)

        def forward(self, x):
            for stage in self.stages[:-1]:
                x = stage(x)[1]
            return self.stages[-1](x)

        def all_logits(self, x):
            """Every exit's logits and the final logits, in ladder order."""
            outs = []
            for stage in self.stages[:-1]:
                exit_logits, x = stage(x)
                outs.append(exit_logits)
            outs.append(self.stages[-1](x))
            return outs

    def ladder():
        return [ExitStage(1, STEM_CHANNELS, stem=True), ExitStage(STEM_CHANNELS, WIDE_CHANNELS),
                ExitStage(WIDE_CHANNELS, WIDE_CHANNELS), FinalStage()]

    return ladder, Full


def _augment(torch, batch):
    """Random shifts of up to one pixel (zero padded): the digits are not centred identically."""
    padded = torch.nn.functional.pad(batch, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,)).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def _train(torch, full, x_train, y_train, epochs, log):
    generator = torch.Generator().manual_seed(TRAIN_SEED)
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
            *exits, final = full.all_logits(xb)
            loss = loss_fn(final, yb) + sum(w * loss_fn(e, yb) for w, e in zip(EXIT_LOSS_WEIGHTS, exits))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            log(f"  epoch {epoch + 1}/{epochs}  loss {total / len(order):.4f}")


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


def build(out_dir: Path, log=print, epochs: int = EPOCHS, split_seed: int | None = None) -> dict:
    """Train, export and describe the ``digits`` model in ``out_dir``; returns its model.json.

    ``epochs`` below the default gives a quick, less accurate model (tests use it). ``split_seed``
    (an integer >= 0; None: ``SPLIT_SEED``) draws the split; training always uses ``TRAIN_SEED``,
    so two builds that differ in the split seed differ only in which rows each part holds.
    """
    split_seed = SPLIT_SEED if split_seed is None else split_seed
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or not 0 <= split_seed < 2**32:
        raise SystemExit(f"the split seed must be an integer in [0, 2**32), got {split_seed!r}")
    try:
        import torch
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise SystemExit(
            f"building models needs the 'models' extra ({exc.name} is missing): "
            "pip install torch==2.13.0 -e '.[models]'"
        ) from exc

    started = time.perf_counter()
    torch.manual_seed(TRAIN_SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train, val, test, dropped = _split(len(labels), labels, images, split_seed)
    log(f"split (seed {split_seed}): {len(train)} train, {len(val)} validation, {len(test)} held out "
        f"({dropped} held-out duplicates of training images dropped)")

    ladder, Full = _networks(torch)
    stages = ladder()
    full = Full(stages)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    _train(torch, full, x_all[train], y_all[train], epochs, log)
    full.eval()

    with torch.no_grad():
        val_logits = [t.numpy() for t in full.all_logits(x_all[val])]
        test_logits = [t.numpy() for t in full.all_logits(x_all[test])]

    def accuracy_of(logits, idx):
        return [round(float((out.argmax(1) == labels[idx]).mean()), 6) for out in logits]

    accuracy = {"validation_per_stage": accuracy_of(val_logits, val),
                "heldout_per_stage": accuracy_of(test_logits, test)}
    log("accuracy per exit and final, validation: " + ", ".join(f"{a:.4f}" for a in accuracy["validation_per_stage"]))
    log("accuracy per exit and final, held out:   " + ", ".join(f"{a:.4f}" for a in accuracy["heldout_per_stage"]))

    for old in out_dir.glob("stage*.onnx"):  # a previous build may have had more stages
        old.unlink()
    example = x_all[test[:1]]
    _export(torch, full, example, out_dir / "full.onnx", ["x"], ["logits"])
    stage_entries, hidden = [], example
    with torch.no_grad():
        for k, stage in enumerate(stages, start=1):
            last = k == len(stages)
            outputs = ["logits"] if last else ["exit_logits", "hidden"]
            # A graph cannot take and give the same name: later stages take "hidden_in".
            inputs = ["x"] if k == 1 else ["hidden_in"]
            _export(torch, stage, hidden, out_dir / f"stage{k}.onnx", inputs, outputs)
            stage_entries.append({"file": f"stage{k}.onnx", "inputs": inputs, "outputs": outputs})
            if not last:
                hidden = stage(hidden)[1]
    np.savez_compressed(
        out_dir / "eval.npz", x=images[test], y=labels[test], source_index=test.astype(np.int32)
    )
    np.savez_compressed(
        out_dir / "validation.npz", x=images[val], y=labels[val], source_index=val.astype(np.int32)
    )

    meta = {
        "name": "digits",
        "task": "image-classification",
        "classes": [str(c) for c in range(10)],
        "outputs_are": "logits",
        "input": {"name": "x", "dtype": "float32", "shape": [-1, 1, 8, 8],
                  "description": "8x8 grey image, pixel value / 16, in [0, 1]"},
        "full": {"file": "full.onnx", "inputs": ["x"], "outputs": ["logits"]},
        "stages": stage_entries,
        "eval": {"file": "eval.npz", "n": int(len(test))},
        "validation": {"file": "validation.npz", "n": int(len(val))},
        "split": {"seed": split_seed, "heldout_sha256": heldout_digest(test),
                  "heldout_identity": "indices into sklearn.datasets.load_digits, sorted, decimal, ','-joined"},
        "build": {
            "source": "sklearn.datasets.load_digits",
            "seed": TRAIN_SEED,
            "split_seed": split_seed,
            "split": {"train": int(len(train)), "validation": int(len(val)),
                      "heldout": int(len(test)), "heldout_duplicates_dropped": dropped},
            "epochs": epochs,
            "exit_loss_weights": list(EXIT_LOSS_WEIGHTS),
            "accuracy": accuracy,
            "torch": torch.__version__,
            "opset": OPSET,
            "duration_s": round(time.perf_counter() - started, 1),
        },
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built digits in {meta['build']['duration_s']} s -> {out_dir}")
    return meta
