"""Tiny random-initialised Hugging Face checkpoints and labelled texts, made offline in a test:
what a user brings to ``green-mlops ladder build``, at a size that builds in seconds."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

POSITIVE = ("great", "good", "fine", "superb", "lovely", "moving")
NEGATIVE = ("awful", "bad", "poor", "dull", "boring", "weak")
NEUTRAL = ("the", "movie", "plot", "actor", "scene", "story", "was", "is", "a", "very", "and", "of")


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "roberta":
        special = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"}
        order = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa pads with id 1
    else:
        special = {"cls": "[CLS]", "pad": "[PAD]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
        order = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate([*order, *POSITIVE, *NEGATIVE, *NEUTRAL])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=special["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{special['cls']} $A {special['sep']}",
        special_tokens=[(special["cls"], vocab[special["cls"]]), (special["sep"], vocab[special["sep"]])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token=special["cls"], pad_token=special["pad"],
                                   sep_token=special["sep"], unk_token=special["unk"], mask_token=special["mask"]), len(vocab)


def tiny_text_checkpoint(root: Path, kind: str = "bert", num_labels: int = 2, head: bool = True, layers: int = 3,
                         seed: int = 0) -> Path:
    """Save a random-initialised ``kind`` (bert, distilbert, roberta) sequence classifier (or, with
    ``head=False``, a bare encoder) and its tokenizer under ``root``; returns the directory."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer(kind)
    common = {"vocab_size": vocab_size, "num_labels": num_labels, "max_position_embeddings": 64}
    if kind == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=layers, n_heads=2, hidden_dim=48, pad_token_id=0, **common)
        model_class = (transformers.DistilBertForSequenceClassification if head else transformers.DistilBertModel)
    elif kind == "roberta":
        config = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                            intermediate_size=48, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                            **{**common, "max_position_embeddings": 66})
        model_class = transformers.RobertaForSequenceClassification if head else transformers.RobertaModel
    else:
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                         intermediate_size=48, pad_token_id=0, **common)
        model_class = transformers.BertForSequenceClassification if head else transformers.BertModel
    if head:
        config.id2label = {i: name for i, name in enumerate(("negative", "positive", "mixed")[:num_labels])}
        config.label2id = {name: i for i, name in config.id2label.items()}
    model = model_class(config)
    directory = Path(root)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def labelled_texts(path: Path, rows: int = 2000, seed: int = 0, names: bool = False) -> Path:
    """A CSV of short synthetic reviews (``text``, ``label``): positive when it holds more praise
    than blame. ``names``: labels as 'negative'/'positive' instead of 0/1."""
    rng = np.random.default_rng(seed)
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            good, bad = int(rng.integers(0, 3)), int(rng.integers(0, 3))
            words = [*rng.choice(POSITIVE, good), *rng.choice(NEGATIVE, bad), *rng.choice(NEUTRAL, int(rng.integers(2, 8)))]
            rng.shuffle(words)
            label = int(good > bad) if good != bad else int(rng.integers(0, 2))
            writer.writerow([" ".join(words), ("negative", "positive")[label] if names else label])
    return Path(path)


def digits_image_folder(root: Path, size: int = 32) -> Path:
    """scikit-learn's 8×8 digits written as ``size``-pixel PNGs in one folder per class, each
    image twice (as is, and shifted one pixel right): 3,594 images, enough rows to certify the
    default budget."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for variant, pixels in (("a", image), ("b", np.roll(image, 1, axis=1))):
            grey = (pixels / 16.0 * 255).astype(np.uint8)
            Image.fromarray(grey, mode="L").resize((size, size), Image.NEAREST).save(folder / f"{i:04d}{variant}.png")
    return root


def trained_resnet18(path: Path, images: Path, size: int = 32, steps: int = 60, seed: int = 0) -> Path:
    """A ResNet-18 (torchvision's definition, random init, 10 outputs) trained briefly on the image
    folder; its state dict saved at ``path``, as a user would bring it."""
    import torch

    from green_mlops.ladder.resnet import ResNet
    from green_mlops.ladder.vision import image_folder, load_images

    torch.manual_seed(seed)
    files, labels, _ = image_folder(images)
    x = torch.from_numpy(load_images(files, size, lambda line: None))
    y = torch.tensor(labels)
    net = ResNet("resnet18", num_classes=10)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(steps):
        rows = torch.from_numpy(rng.choice(len(x), 64, replace=False))
        loss = torch.nn.functional.cross_entropy(net(x[rows]), y[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    torch.save(net.state_dict(), path)
    return Path(path)
