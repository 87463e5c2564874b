"""``ladder build`` for images: a ResNet (18, 34 or 50, torchvision's definition and parameter
names, :mod:`green_mlops.ladder.resnet`) from a local weights file, and an image folder (one
sub-folder per class, ImageFolder's convention: classes sorted by folder name, class k is the
head's output k), turned into a 4-stage early-exit model directory: an exit after each of the
first three residual stages, the network's own ``fc`` after the fourth. The backbone and ``fc``
are untouched (``full.onnx`` is the user's network), the exit heads (global average pool +
linear) are trained on frozen features, as for text. Images are resized to ``image_size`` square
and normalised with ImageNet's mean and standard deviation (recorded in ``model.json``): the
gateway then takes ``[n, 3, S, S]`` float32 tensors, the same preprocessing done by the client.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from green_mlops.ladder.common import (DISTILL_ALPHA, DISTILL_TEMPERATURE, HEAD_LR, HEAD_STEPS, LadderBuildError,
                                       Progress, fit_head, model_name, require_rows, split_rows, staged_directory)
from targets.model.model_dir import heldout_digest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights expect
BATCH = 64
OPSET = 17
TRAIN_SEED = 0


def image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """``(files, class indices, class names)`` of an image folder; LadderBuildError when empty."""
    root = Path(root)
    if not root.is_dir():
        raise LadderBuildError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise LadderBuildError(f"{root} needs one sub-folder per class, two or more; found {len(classes)}")
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise LadderBuildError(f"class folder {root / name} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        files.extend(found)
        labels.extend([index] * len(found))
    return files, labels, classes


def load_images(files: list[Path], size: int, log) -> np.ndarray:
    """``[n, 3, size, size]`` float32, RGB, resized (bilinear) and normalised."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 3, size, size), dtype=np.float32)
    mean, std = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    progress = Progress(log, "images", len(files))
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise LadderBuildError(f"cannot read image {path}: {exc}") from exc
        out[i] = (np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
        progress.step(i + 1)
    return out


def load_resnet(torch, arch: str, weights: Path):
    """The user's network with its weights (a state dict, or a checkpoint holding one under
    ``state_dict`` or ``model``); LadderBuildError when they do not fit ``arch``."""
    from green_mlops.ladder.resnet import ARCHITECTURES, ResNet

    if arch not in ARCHITECTURES:
        raise LadderBuildError(f"unsupported architecture '{arch}': ladder build cuts {', '.join(ARCHITECTURES)} "
                               "(torchvision's definitions) and Hugging Face encoders (--checkpoint)")
    if not Path(weights).is_file():
        raise LadderBuildError(f"weights file not found: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise LadderBuildError(f"cannot read weights {weights}: {exc}") from exc
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise LadderBuildError(f"{weights} holds no ResNet state dict (no 'fc.weight')")
    net = ResNet(arch, num_classes=int(state["fc.weight"].shape[0]))
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LadderBuildError(f"the weights in {weights} do not fit {arch}: missing {result.missing_keys[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]}")
    return net.eval()


def build_vision(arch: str, weights: Path, images: Path, out_dir: Path, image_size: int = 224, name: str | None = None,
                 split_seed: int = 0, allow_small: bool = False, log=print) -> dict:
    """Build the model directory (see the module docstring); returns its ``model.json``."""
    started = time.perf_counter()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError as exc:
        raise LadderBuildError("ladder build needs the 'models' extra (torch is missing): "
                               "pip install torch==2.13.0 -e '.[models]'") from exc
    from green_mlops.ladder.resnet import ResNetLadder

    name = model_name(name, out_dir)
    if image_size < 16:
        raise LadderBuildError(f"--image-size must be >= 16, got {image_size}")
    files, labels, folders = image_folder(images)
    require_rows(len(files), allow_small)
    net = load_resnet(torch, arch, weights)
    outputs = net.fc.out_features
    if len(folders) > outputs:
        raise LadderBuildError(f"{images} has {len(folders)} class folders but the network's fc has {outputs} outputs")
    classes = folders + [f"class {k}" for k in range(len(folders), outputs)]
    labels = np.array(labels, dtype=np.int64)
    train, val, test = split_rows(labels, split_seed)
    log(f"{arch} ({outputs} outputs) on {images}: {len(files):,} images, {len(folders)} classes at {image_size}×{image_size}; "
        f"split seed {split_seed}: {len(train):,} train, {len(val):,} validation, {len(test):,} held out")
    torch.manual_seed(TRAIN_SEED)
    ladder = ResNetLadder(net, outputs).eval()
    x = load_images(files, image_size, log)
    probe = torch.from_numpy(x[:min(len(x), BATCH)])
    tick = time.perf_counter()
    with torch.no_grad():
        net(probe)
    per_row_s = (time.perf_counter() - tick) / len(probe)
    log(f"ladder: 4 stages, exits after residual stages 1-3; backbone and fc frozen, exit heads trained; estimated "
        f"about {per_row_s * len(x) * 2 + 5:.0f} s here; memory about "
        f"{2 * x.nbytes / 2**20 + sum(p.numel() for p in net.parameters()) * 4 / 2**20 + 1000:,.0f} MB")
    pooled, final = _features(torch, ladder, x[train], Progress(log, "features", len(train)))
    for k, stage in enumerate(ladder.stages[:-1]):
        fit_head(torch, stage.head, pooled[k], labels[train], final)
    accuracy = {part: _accuracies(torch, ladder, x[rows], labels[rows]) for part, rows in (("validation", val),
                                                                                             ("heldout", test))}
    log("held-out accuracy %: " + " ".join(f"{k} {100 * v:.1f}" for k, v in accuracy["heldout"].items()))
    with staged_directory(out_dir) as building:
        entries = _export(torch, ladder, x[test[:2]], building)
        check = _check(torch, ladder, building, x[test], entries)
        log(f"checks: stages chained vs full.onnx max |diff| {check['chain_vs_full_max_abs']:.1e}; full.onnx vs the "
            f"network on {check['checkpoint_rows']} held-out images: {check['checkpoint_answers_equal']} answers equal")
        np.savez_compressed(building / "eval.npz", x=x[test], y=labels[test], source_index=test.astype(np.int32))
        np.savez_compressed(building / "validation.npz", x=x[val], y=labels[val], source_index=val.astype(np.int32))
        meta = {
            "name": name, "task": "image-classification", "classes": classes, "outputs_are": "logits",
            "input": {"name": "x", "dtype": "float32", "shape": [-1, 3, image_size, image_size],
                      "description": f"RGB images resized to {image_size}×{image_size}, scaled to [0, 1], normalised "
                                     f"with mean {list(MEAN)} and std {list(STD)}"},
            "full": {"file": "full.onnx", "inputs": ["x"], "outputs": ["logits"]},
            "stages": entries,
            "eval": {"file": "eval.npz", "n": int(len(test))},
            "validation": {"file": "validation.npz", "n": int(len(val))},
            "split": {"seed": split_seed, "heldout_sha256": heldout_digest(test),
                      "heldout_identity": f"positions in the sorted file list of {Path(images).name} (class folders "
                                          "sorted, files sorted within each), sorted, decimal, ','-joined"},
            "build": {"builder": "green-mlops ladder build (vision)", "architecture": arch,
                      "weights": str(Path(weights).resolve()), "images": str(Path(images).resolve()),
                      "image_size": image_size, "final_classifier": "the network's own fc",
                      "seed": TRAIN_SEED, "split_seed": split_seed,
                      "training": {"mode": "frozen backbone", "head_steps": HEAD_STEPS, "lr": HEAD_LR,
                                   "distill_alpha": DISTILL_ALPHA, "distill_temperature": DISTILL_TEMPERATURE},
                      "split": {"train": int(len(train)), "validation": int(len(val)), "heldout": int(len(test))},
                      "accuracy": {**accuracy, "heldout_full": accuracy["heldout"]["final"]},
                      "checks": check, "torch": torch.__version__, "opset": OPSET,
                      "duration_s": round(time.perf_counter() - started, 1)},
        }
        (building / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built {name} (4-stage ResNet ladder) in {meta['build']['duration_s']} s -> {out_dir}")
    return meta


def _batches(n: int):
    return (np.arange(i, min(i + BATCH, n)) for i in range(0, n, BATCH))


def _features(torch, ladder, x: np.ndarray, progress: Progress):
    """Each exit's pooled features and the network's logits, per row."""
    pooled = [np.zeros((len(x), stage.head.in_features), np.float32) for stage in ladder.stages[:-1]]
    final = None
    with torch.no_grad():
        for rows in _batches(len(x)):
            h = torch.from_numpy(x[rows])
            for k, stage in enumerate(ladder.stages):
                if stage.last:
                    logits = stage(h).numpy()
                    final = np.zeros((len(x), logits.shape[1]), np.float32) if final is None else final
                    final[rows] = logits
                else:
                    h = stage.features(h)
                    pooled[k][rows] = torch.flatten(ladder.net.avgpool(h), 1).numpy()
            progress.step(int(rows[-1]) + 1)
    return pooled, final


def _accuracies(torch, ladder, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    right = None
    with torch.no_grad():
        for rows in _batches(len(x)):
            outs = ladder(torch.from_numpy(x[rows]))
            hits = [(o.argmax(1).numpy() == y[rows]).sum() for o in outs]
            right = hits if right is None else [a + b for a, b in zip(right, hits)]
    names = [f"exit{k + 1}" for k in range(len(right) - 1)] + ["final"]
    return {n: round(float(r) / len(x), 4) for n, r in zip(names, right)}


def _export(torch, ladder, example: np.ndarray, out_dir: Path) -> list[dict]:
    entries, x = [], torch.from_numpy(example)
    with torch.no_grad():
        torch.onnx.export(ladder.net, (x,), str(out_dir / "full.onnx"), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
        for k, stage in enumerate(ladder.stages):
            inputs = ["x"] if k == 0 else ["hidden_in"]
            outputs = ["logits"] if stage.last else ["exit_logits", "hidden"]
            torch.onnx.export(stage, (x,), str(out_dir / f"stage{k + 1}.onnx"), input_names=inputs,
                              output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
                              opset_version=OPSET, dynamo=False)
            entries.append({"file": f"stage{k + 1}.onnx", "inputs": inputs, "outputs": outputs})
            if not stage.last:
                x = stage(x)[1]
    return entries


def _check(torch, ladder, directory: Path, x: np.ndarray, entries: list[dict]) -> dict:
    """ONNX Runtime: the stages chained against ``full.onnx``, and ``full.onnx`` against the
    network in torch, on every held-out image."""
    import onnxruntime as ort

    def session(file):
        return ort.InferenceSession(str(directory / file), providers=["CPUExecutionProvider"])

    full, stages = session("full.onnx"), [session(e["file"]) for e in entries]
    chain, equal, largest = 0.0, 0, 0.0
    with torch.no_grad():
        for rows in _batches(len(x)):
            batch = x[rows]
            expected = full.run(["logits"], {"x": batch})[0]
            h = batch
            for stage, entry in zip(stages, entries):
                out = stage.run(entry["outputs"], {entry["inputs"][0]: h})
                h = out[-1]
            chain = max(chain, float(np.abs(out[0] - expected).max()))
            reference = ladder.net(torch.from_numpy(batch)).numpy()
            equal += int((reference.argmax(1) == expected.argmax(1)).sum())
            largest = max(largest, float(np.abs(reference - expected).max()))
    return {"rows": int(len(x)), "chain_vs_full_max_abs": chain, "checkpoint_rows": int(len(x)),
            "checkpoint_answers_equal": equal, "checkpoint_max_abs": largest}
