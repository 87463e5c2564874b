"""Serving: the FastAPI gateway (infer lane, dynamic batching, live dashboard) and the Triton model
repository with the ladder and its controller inside Triton. This package imports nothing itself, so
``targets.serving.triton_bio`` loads without FastAPI."""
