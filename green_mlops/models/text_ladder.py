"""A Hugging Face encoder (BERT, RoBERTa, MiniLM, DistilBERT) cut into an early-exit ladder, and
its ONNX export.

Stage k runs the transformer layers up to its exit (stage 1 first runs the embeddings; by default
one layer per stage) and, for every stage but the last, an exit head: masked mean pool + linear ->
``exit_logits``. The last stage ends in the final classifier -> ``logits``: a fresh masked-mean
head (``reviews``) or a checkpoint's own classification head (:mod:`green_mlops.ladder.text`). Between stages the hidden state travels with the
attention mask as its last channel (``[n, L, hidden + 1]``), so each stage has a single input; the
mask is derived once, in stage 1, from ``input_ids != pad_id``. The sequence axis ``L`` is dynamic in
every graph: a batch may be trimmed to its longest row.

``full.onnx`` is the plain encoder + final head, without the exits and without carrying the mask
channel between layers: what the standard path runs.

Graph names: stage 1 takes ``input_ids``; stages 2..N take ``hidden_in``; every stage but the last
returns ``exit_logits`` and ``hidden``; the last returns ``logits``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17


def _extended(mask: torch.Tensor) -> torch.Tensor:
    """The additive attention mask of a ``[n, L]`` 0/1 mask: 0 where attended, float min elsewhere."""
    return (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``h`` over the positions where ``mask`` is 1 (the pooling all-MiniLM-L6-v2 was trained with)."""
    weights = mask[..., None]
    return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class MeanPoolHead(nn.Module):
    """An exit head (and ``reviews``' final classifier): masked mean pool + linear."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(masked_mean(h, mask))


def encoder_layers(encoder: nn.Module) -> list[nn.Module]:
    """The transformer layers of a Hugging Face encoder, in order: ``encoder.layer`` (BERT,
    RoBERTa, MiniLM) or ``transformer.layer`` (DistilBERT)."""
    for path in ("encoder.layer", "transformer.layer"):
        module = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None:
            return list(module)
    raise ValueError(f"{type(encoder).__name__}: no encoder.layer or transformer.layer to cut into stages")


def run_layer(layer: nn.Module, h: torch.Tensor, extended: torch.Tensor) -> torch.Tensor:
    out = layer(h, attention_mask=extended)
    return out[0] if isinstance(out, tuple) else out


class LadderStage(nn.Module):
    """One rung: (embeddings +) one or more transformer layers + a head: an exit head (masked mean
    pool + linear) for every stage but the last, the final classifier for the last."""

    def __init__(self, layers, hidden_size: int, num_classes: int, embeddings: nn.Module | None, last: bool,
                 pad_id: int = 0, head: nn.Module | None = None):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers if isinstance(layers, (list, tuple, nn.ModuleList)) else [layers])
        self.head = head if head is not None else MeanPoolHead(hidden_size, num_classes)
        self.last = last
        self.pad_id = pad_id

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden after this stage's layers, 0/1 mask) from ``input_ids`` (stage 1) or hidden+mask."""
        if self.embeddings is not None:
            mask = (x != self.pad_id).to(torch.float32)
            h = self.embeddings(input_ids=x)
        else:
            h, mask = x[..., :-1], x[..., -1]
        extended = _extended(mask)
        for layer in self.layers:
            h = run_layer(layer, h, extended)
        return h, mask

    def forward(self, x: torch.Tensor):
        h, mask = self.encode(x)
        logits = self.head(h, mask)
        if self.last:
            return logits
        return logits, torch.cat([h, mask[..., None]], dim=-1)


class Ladder(nn.Module):
    """The whole encoder as stages; ``forward`` returns every exit's logits, the final last.

    ``exits_after``: the 1-based layers an exit follows (default: every layer but the last);
    ``final_head``: a module ``(hidden, mask) -> logits`` for the last stage (default: a fresh
    masked-mean + linear head); ``pad_id``: the tokenizer's padding id (rows' mask)."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2, pad_id: int = 0, final_head: nn.Module | None = None,
                 exits_after: list[int] | None = None):
        super().__init__()
        layers = encoder_layers(encoder)
        hidden = encoder.config.hidden_size if hasattr(encoder.config, "hidden_size") else encoder.config.dim
        self.hidden_size = hidden
        self.pad_id = pad_id
        cuts = sorted(set(exits_after)) if exits_after is not None else list(range(1, len(layers)))
        if not cuts or cuts[0] < 1 or cuts[-1] >= len(layers):
            raise ValueError(f"exits must follow layers 1 … {len(layers) - 1}, got {cuts}")
        bounds = [0, *cuts, len(layers)]
        groups = [layers[a:b] for a, b in zip(bounds, bounds[1:])]
        self.exits_after = cuts
        self.stages = nn.ModuleList(
            LadderStage(group, hidden, num_classes, encoder.embeddings if k == 0 else None, last=k == len(groups) - 1,
                        pad_id=pad_id, head=final_head if k == len(groups) - 1 else None)
            for k, group in enumerate(groups))

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], input_ids
        for stage in self.stages[:-1]:
            logits, x = stage(x)
            out.append(logits)
        out.append(self.stages[-1](x))
        return out


class FullGraph(nn.Module):
    """The standard model: embeddings, every layer, the final head; no exits, no mask channel."""

    def __init__(self, ladder: Ladder):
        super().__init__()
        self.ladder = ladder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        stages = self.ladder.stages
        mask = (input_ids != self.ladder.pad_id).to(torch.float32)
        extended = _extended(mask)
        h = stages[0].embeddings(input_ids=input_ids)
        for stage in stages:
            for layer in stage.layers:
                h = run_layer(layer, h, extended)
        return stages[-1].head(h, mask)


def stage_entries(n_stages: int) -> list[dict]:
    """The ``stages`` list of ``model.json`` for ``stage1.onnx`` ... ``stage{n}.onnx``."""
    entries = []
    for k in range(1, n_stages + 1):
        inputs = ["input_ids"] if k == 1 else ["hidden_in"]
        outputs = ["logits"] if k == n_stages else ["exit_logits", "hidden"]
        entries.append({"file": f"stage{k}.onnx", "inputs": inputs, "outputs": outputs})
    return entries


def _export(module: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str]) -> None:
    dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs}
    dynamic.update({name: ({0: "batch", 1: "sequence"} if name.startswith("hidden") else {0: "batch"})
                    for name in outputs})
    torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_ladder(ladder: Ladder, example_ids: np.ndarray, out_dir: Path, full: nn.Module | None = None) -> list[dict]:
    """Write ``full.onnx`` and one graph per stage; returns the ``stages`` entries of ``model.json``.

    ``full``: the module ``input_ids -> logits`` exported as ``full.onnx`` (default
    :class:`FullGraph` of the ladder; a user's checkpoint passes its own model, so that the standard
    path runs exactly it). ``example_ids`` should hold at least two rows of different lengths
    (padding present), so the traced graphs see the mask at work; the batch and sequence axes are
    exported as dynamic."""
    ladder.eval()
    entries = stage_entries(len(ladder.stages))
    x = torch.from_numpy(example_ids)
    # eval() on the wrapper too: the exporter restores each module's mode afterwards, and a fresh
    # wrapper is in training mode, which would switch the ladder's dropout back on.
    with torch.no_grad():
        _export((full if full is not None else FullGraph(ladder)).eval(), x, out_dir / "full.onnx", ["input_ids"],
                ["logits"])
        for stage, entry in zip(ladder.stages, entries):
            _export(stage, x, out_dir / entry["file"], entry["inputs"], entry["outputs"])
            if not stage.last:
                x = stage(x)[1]
    return entries


def check_export(ladder: Ladder, out_dir: Path, ids: np.ndarray) -> dict:
    """Run the exported graphs with ONNX Runtime on ``ids`` (trimmed to their longest row) and
    compare: stages chained vs ``full.onnx``, and each stage's exit logits vs the torch ladder.
    Returns the maximum absolute differences."""
    import onnxruntime as ort

    width = max(int((ids != ladder.pad_id).sum(1).max()), 1)
    ids = np.ascontiguousarray(ids[:, :width])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def session(name):
        return ort.InferenceSession(str(out_dir / name), options, providers=["CPUExecutionProvider"])

    ladder.eval()
    with torch.no_grad():
        expected = [t.numpy() for t in ladder(torch.from_numpy(ids))]
    full = session("full.onnx").run(["logits"], {"input_ids": ids})[0]
    entries = stage_entries(len(ladder.stages))
    x, exits_diff = ids, 0.0
    for k, entry in enumerate(entries):
        sess = session(entry["file"])
        outputs = sess.run(entry["outputs"], {entry["inputs"][0]: x})
        exits_diff = max(exits_diff, float(np.abs(outputs[0] - expected[k]).max()))
        if len(outputs) == 2:
            x = outputs[1]
    chained = outputs[0]
    return {"rows": int(len(ids)), "sequence": width,
            "chain_vs_full_max_abs": float(np.abs(chained - full).max()),
            "onnx_vs_torch_max_abs": exits_diff}
