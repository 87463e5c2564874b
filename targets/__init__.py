"""Inference targets: model directories, backends (ONNX Runtime, Triton) and the τ(t) controller."""
