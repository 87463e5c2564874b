"""The model contract: model directories (``model.json``, the ladder's stages), the registry of
embedded models, the edge tokenizer of text models."""
