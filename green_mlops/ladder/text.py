"""``ladder build`` for text: a local Hugging Face encoder checkpoint (BERT, RoBERTa, XLM-RoBERTa,
MiniLM, DistilBERT families) and labelled texts, turned into an N-stage early-exit model directory.

* The checkpoint is loaded with ``local_files_only`` (nothing is fetched). A sequence classifier
  (``…ForSequenceClassification``) keeps its own final classifier: the last stage ends in it and
  ``full.onnx`` *is* the checkpoint's own forward pass, so the standard path answers as the user's
  model does (checked on the held-out rows and recorded). A bare encoder (a sentence encoder) gets
  a final head trained too (masked mean pool + linear).
* An exit head (masked mean pool + linear) after every layer, or after every k-th (``--exits``).
  By default the backbone is frozen: one forward pass over the rows gives each exit's pooled
  features and the full model's logits, and each head is trained on them alone (cross-entropy on
  the labels mixed with distillation from the full model, so an exit is confident where it agrees
  with the full model: what the budget's certificate rewards). ``--finetune`` trains every layer
  and head jointly instead (the ``reviews`` recipe; the final classifier then changes too).
* Split train / validation / held-out by a seed (recorded with the held-out rows' digest), the
  tokenizer exported beside the graphs, checks at build time recorded in ``model.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from green_mlops.ladder.common import (DISTILL_ALPHA, DISTILL_TEMPERATURE, HEAD_LR, HEAD_STEPS, LadderBuildError,
                                       Progress, fit_head, map_labels, model_name, read_table, require_rows, split_rows,
                                       staged_directory)
from targets.model.model_dir import heldout_digest

SUPPORTED = ("bert", "roberta", "xlm-roberta", "distilbert")
"""``config.model_type`` values this builder cuts (MiniLM checkpoints are ``bert``)."""
FEATURE_BATCH = 64
BASE_MEMORY_MB = 1500  # torch, transformers, the ONNX export and ONNX Runtime: MiniLM-L6 peaked at 1.8 GB here
TRAIN_SEED = 0


def _imports():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise LadderBuildError(f"ladder build needs the 'models' extra ({exc.name} is missing): "
                               "pip install torch==2.13.0 -e '.[models]'") from exc
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


class CheckpointHead:
    """Factory for the checkpoint's own classification head as a module ``(hidden, mask) -> logits``."""

    @staticmethod
    def of(torch, model, model_type: str):
        nn = torch.nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.model_type = model_type
                if model_type == "bert":
                    self.pooler, self.dropout, self.classifier = model.bert.pooler, model.dropout, model.classifier
                elif model_type in ("roberta", "xlm-roberta"):
                    self.classifier = model.classifier
                else:  # distilbert
                    self.pre_classifier, self.dropout, self.classifier = (model.pre_classifier, model.dropout,
                                                                          model.classifier)

            def forward(self, h, mask):
                if self.model_type == "bert":
                    return self.classifier(self.dropout(self.pooler(h)))
                if self.model_type in ("roberta", "xlm-roberta"):
                    return self.classifier(h)
                return self.classifier(self.dropout(torch.relu(self.pre_classifier(h[:, 0]))))

        return Head()


def read_config(directory: Path):
    """``(torch, transformers, config, has_head)`` of a checkpoint directory, before any weights
    are loaded; LadderBuildError for a directory or architecture this builder cannot use."""
    torch, transformers = _imports()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise LadderBuildError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise LadderBuildError(f"cannot read the checkpoint's config.json in {directory}: {exc}") from exc
    if config.model_type not in SUPPORTED:
        raise LadderBuildError(f"unsupported architecture '{config.model_type}' in {directory}: ladder build cuts "
                               f"{', '.join(SUPPORTED)} encoders (MiniLM checkpoints are 'bert')")
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    return torch, transformers, config, has_head


def load_checkpoint(directory: Path, transformers, config, has_head: bool, log):
    """``(model or None, encoder, tokenizer)``: the sequence classifier (None for a bare encoder),
    its encoder, and the fast tokenizer; LadderBuildError for what cannot be loaded."""
    directory = Path(directory)
    try:
        if has_head:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                directory, local_files_only=True, attn_implementation="eager")
            encoder = getattr(model, model.base_model_prefix)
        else:
            model, encoder = None, transformers.AutoModel.from_pretrained(directory, local_files_only=True,
                                                                          attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise LadderBuildError(f"cannot load the checkpoint in {directory}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:
        raise LadderBuildError(f"the checkpoint's tokenizer in {directory} has no fast form or no padding token: "
                               "the gateway tokenises with a tokenizer.json")
    (model or encoder).eval()
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers
    log(f"checkpoint {directory.name}: {config.model_type}, {layers} layers, "
        + (f"its own classifier over {config.num_labels} classes" if has_head else "a bare encoder (a final head "
           "will be trained)"))
    return model, encoder, tokenizer


def exit_layers(n_layers: int, every: int) -> list[int]:
    """The 1-based layers an exit follows: every ``every``-th, never the last."""
    if every < 1:
        raise LadderBuildError(f"--exits must be >= 1 (an exit after every k-th layer), got {every}")
    cuts = list(range(every, n_layers, every))
    if not cuts:
        raise LadderBuildError(f"--exits {every} leaves no exit before the last of the {n_layers} layers")
    return cuts


def _pooled_features(torch, ladder, ids: np.ndarray, progress: Progress | None = None):
    """Per row: each stage's masked-mean pooled hidden state (exits) and the final logits."""
    from green_mlops.models.build_reviews import _lengths, _trimmed, length_batches
    from green_mlops.models.text_ladder import masked_mean

    lengths = _lengths(ids, ladder.pad_id)
    n_stages = len(ladder.stages)
    pooled = [np.zeros((len(ids), ladder.hidden_size), dtype=np.float32) for _ in range(n_stages)]
    final = None
    done = 0
    with torch.no_grad():
        for rows in length_batches(lengths, FEATURE_BATCH, None):
            x = torch.from_numpy(_trimmed(ids, rows, lengths))
            for k, stage in enumerate(ladder.stages):
                h, mask = stage.encode(x)
                pooled[k][rows] = masked_mean(h, mask).numpy()
                if stage.last:
                    logits = stage.head(h, mask).numpy()
                    if final is None:
                        final = np.zeros((len(ids), logits.shape[1]), dtype=np.float32)
                    final[rows] = logits
                else:
                    x = torch.cat([h, mask[..., None]], dim=-1)
            done += len(rows)
            if progress is not None:
                progress.step(done)
    return pooled, final


def build_text(checkpoint: Path, data: Path, out_dir: Path, text_column: str = "text", label_column: str = "label",
               name: str | None = None, exits_every: int = 1, finetune: bool = False, epochs: int = 2,
               max_length: int = 128, split_seed: int = 0, allow_small: bool = False, log=print) -> dict:
    """Build the model directory (see the module docstring); returns its ``model.json``."""
    started = time.perf_counter()
    name = model_name(name, out_dir)
    if max_length < 2 or epochs < 1:
        raise LadderBuildError("--max-length must be >= 2 and --epochs >= 1")
    # Everything that can be checked before the weights load is checked first.
    torch, transformers, config, has_head = read_config(checkpoint)
    texts, raw = read_table(data, text_column, label_column)
    require_rows(len(texts), allow_small)
    classes = [str(config.id2label[i]) for i in range(config.num_labels)] if has_head else None
    labels, classes = map_labels(raw, classes)
    train, val, test = split_rows(labels, split_seed)
    model, encoder, tokenizer = load_checkpoint(checkpoint, transformers, config, has_head, log)
    log(f"data {Path(data).name}: {len(texts):,} rows, {len(classes)} classes; split seed {split_seed}: "
        f"{len(train):,} train, {len(val):,} validation, {len(test):,} held out")
    torch.manual_seed(TRAIN_SEED)
    from green_mlops.models.build_reviews import _train, ladder_logits
    from green_mlops.models.text_ladder import OPSET, Ladder, check_export, encoder_layers, export_ladder

    cuts = exit_layers(len(encoder_layers(encoder)), exits_every)
    head = None if model is None else CheckpointHead.of(torch, model, config.model_type)
    ladder = Ladder(encoder, num_classes=len(classes), pad_id=int(tokenizer.pad_token_id), final_head=head,
                    exits_after=cuts)
    ladder.eval()
    ids = np.array(tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)["input_ids"],
                   dtype=np.int64)
    # Up front: what it costs, from one timed batch.
    probe = ids[:min(len(ids), FEATURE_BATCH)]
    tick = time.perf_counter()
    with torch.no_grad():
        ladder(torch.from_numpy(probe))
    per_row_s = (time.perf_counter() - tick) / len(probe)
    passes = 1 + (3 * epochs if finetune else 0)  # a training step costs about three forward passes
    parameters_mb = sum(p.numel() for p in ladder.parameters()) * 4 / 2**20
    log(f"ladder: {len(ladder.stages)} stages, exits after layers {', '.join(map(str, cuts))}; "
        f"{'fine-tuning every layer for ' + str(epochs) + ' epochs' if finetune else 'backbone frozen, heads trained'}; "
        f"estimated about {per_row_s * len(ids) * passes + 10:.0f} s here, memory about "
        f"{parameters_mb * (4 if finetune else 1.2) + ids.nbytes * 3 / 2**20 + BASE_MEMORY_MB:,.0f} MB")
    # The checkpoint's own answers on the held-out rows, before any training touches it.
    original = _checkpoint_logits(torch, model, ids[test], ladder.pad_id)
    if finetune:
        history = _train(torch, ladder, ids[train], labels[train], ids[val], labels[val], epochs, 32, log)
        training = {"mode": "finetune", "epochs": epochs, "history": history}
    else:
        pooled, final = _pooled_features(torch, ladder, ids[train], Progress(log, "features", len(train)))
        if model is None:  # a bare encoder: its final head first, on the last layer's pooled features
            fit_head(torch, ladder.stages[-1].head.linear, pooled[-1], labels[train], None)
            with torch.no_grad():
                final = ladder.stages[-1].head.linear(torch.from_numpy(pooled[-1])).numpy()
        for k, stage in enumerate(ladder.stages[:-1]):
            fit_head(torch, stage.head.linear, pooled[k], labels[train], final)
        training = {"mode": "frozen backbone", "head_steps": HEAD_STEPS, "lr": HEAD_LR,
                    "distill_alpha": DISTILL_ALPHA, "distill_temperature": DISTILL_TEMPERATURE}
    ladder.eval()
    accuracy = {}
    for part, rows in (("validation", val), ("heldout", test)):
        logits = ladder_logits(torch, ladder, ids[rows])
        accuracy[part] = {(f"exit{k + 1}" if k < len(logits) - 1 else "final"): round(float((o.argmax(1) == labels[rows]).mean()), 4)
                          for k, o in enumerate(logits)}
    log("held-out accuracy %: " + " ".join(f"{k} {100 * v:.1f}" for k, v in accuracy["heldout"].items()))

    full = None
    if model is not None:
        class Original(torch.nn.Module):  # the checkpoint's own forward pass: what standard runs
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids):
                mask = (input_ids != ladder.pad_id).to(torch.int64)
                return self.model(input_ids=input_ids, attention_mask=mask).logits

        full = Original()
    with staged_directory(out_dir) as building:
        from green_mlops.models.build_reviews import _lengths, _trimmed

        lengths = _lengths(ids[test], ladder.pad_id)
        example = _trimmed(ids[test], np.array([int(np.argmax(lengths)), int(np.argmin(lengths))]), lengths)
        entries = export_ladder(ladder, example, building, full=full)
        check = check_export(ladder, building, ids[test[:64]])
        check.update(_against_checkpoint(building, original, ids[test], ladder.pad_id))
        log(f"checks: stages chained vs full.onnx max |diff| {check['chain_vs_full_max_abs']:.1e}"
            + ("" if full is None else f"; full.onnx vs the checkpoint on {check['checkpoint_rows']} held-out rows: "
               f"{check['checkpoint_answers_equal']} answers equal, max |diff| {check['checkpoint_max_abs']:.1e}"))
        tokenizer.backend_tokenizer.save(str(building / "tokenizer.json"))
        np.savez_compressed(building / "eval.npz", x=ids[test], y=labels[test], source_index=test.astype(np.int32))
        np.savez_compressed(building / "validation.npz", x=ids[val], y=labels[val], source_index=val.astype(np.int32))
        (building / "eval_texts.json").write_text(json.dumps([texts[i] for i in test]))
        meta = {
            "name": name,
            "task": "text-classification",
            "classes": classes,
            "outputs_are": "logits",
            "input": {"name": "input_ids", "dtype": "int64", "shape": [-1, -1],
                      "description": f"token ids of the checkpoint's tokenizer, {tokenizer.pad_token_id} = padding, "
                                     f"at most {max_length} per row (the sequence axis is dynamic)"},
            "tokenizer": {"file": "tokenizer.json", "max_length": max_length, "pad_id": int(tokenizer.pad_token_id)},
            "full": {"file": "full.onnx", "inputs": ["input_ids"], "outputs": ["logits"]},
            "stages": entries,
            "eval": {"file": "eval.npz", "n": int(len(test)), "texts": "eval_texts.json"},
            "validation": {"file": "validation.npz", "n": int(len(val))},
            "split": {"seed": split_seed, "heldout_sha256": heldout_digest(test),
                      "heldout_identity": f"row numbers (0-based) in {Path(data).name}, sorted, decimal, ','-joined"},
            "build": {
                "builder": "green-mlops ladder build (text)",
                "checkpoint": str(Path(checkpoint).resolve()), "architecture": config.model_type,
                "final_classifier": "the checkpoint's own" if model is not None else "trained here (bare encoder)",
                "data": str(Path(data).resolve()), "text_column": text_column, "label_column": label_column,
                "seed": TRAIN_SEED, "split_seed": split_seed, "exit_after_layers": cuts, "max_length": max_length,
                "training": training, "split": {"train": int(len(train)), "validation": int(len(val)),
                                                "heldout": int(len(test))},
                "accuracy": {**accuracy, "heldout_full": accuracy["heldout"]["final"]},
                "checks": check, "torch": torch.__version__, "opset": OPSET,
                "duration_s": round(time.perf_counter() - started, 1),
            },
        }
        (building / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built {name} ({len(ladder.stages)}-stage ladder) in {meta['build']['duration_s']} s -> {out_dir}")
    return meta


def _checkpoint_logits(torch, model, ids: np.ndarray, pad_id: int) -> np.ndarray | None:
    """The checkpoint's own logits for ``ids`` (torch, its forward pass); None for a bare encoder."""
    if model is None:
        return None
    from green_mlops.models.build_reviews import _lengths, _trimmed, length_batches

    lengths = _lengths(ids, pad_id)
    out = None
    with torch.no_grad():
        for rows in length_batches(lengths, FEATURE_BATCH, None):
            x = torch.from_numpy(_trimmed(ids, rows, lengths))
            logits = model(input_ids=x, attention_mask=(x != pad_id).to(torch.int64)).logits.numpy()
            out = np.zeros((len(ids), logits.shape[1]), np.float32) if out is None else out
            out[rows] = logits
    return out


def _against_checkpoint(directory: Path, expected: np.ndarray | None, ids: np.ndarray, pad_id: int) -> dict:
    """``full.onnx`` (ONNX Runtime) against the checkpoint's own logits taken before any training,
    every held-out row: answers equal and the largest logit difference (empty for a bare encoder)."""
    if expected is None:
        return {}
    import onnxruntime as ort

    from green_mlops.models.build_reviews import _lengths, _trimmed, length_batches

    session = ort.InferenceSession(str(directory / "full.onnx"), providers=["CPUExecutionProvider"])
    lengths = _lengths(ids, pad_id)
    equal, largest = 0, 0.0
    for rows in length_batches(lengths, FEATURE_BATCH, None):
        got = session.run(["logits"], {"input_ids": _trimmed(ids, rows, lengths)})[0]
        equal += int((expected[rows].argmax(1) == got.argmax(1)).sum())
        largest = max(largest, float(np.abs(expected[rows] - got).max()))
    return {"checkpoint_rows": int(len(ids)), "checkpoint_answers_equal": equal, "checkpoint_max_abs": largest}
