"""Backends that run a model: ONNX Runtime in-process, Triton over HTTP (and its server process), the
KServe v2 wire format they share."""
