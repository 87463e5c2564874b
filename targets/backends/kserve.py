"""The KServe v2 / Triton HTTP inference protocol: request decoding and response encoding.

Pure functions, no web framework: they turn bytes into a checked numpy batch and answers back
into bytes, raising :class:`ProtocolError` (an HTTP 400) that names what is wrong. Both the JSON
form and Triton's binary-data extension (``Inference-Header-Content-Length``) are understood,
so ``tritonclient.http`` calls the gateway exactly as it calls Triton.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from targets.errors import InputError

DATATYPES = {  # KServe v2 name -> numpy dtype
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
HEADER_LENGTH = "inference-header-content-length"
OUTPUT_NAME = "probabilities"
MAX_DIMENSION = 1 << 24


class ProtocolError(InputError):
    """The request does not follow the protocol or the model's signature (HTTP 400)."""


def datatype_of(dtype: np.dtype) -> str:
    for name, numpy_type in DATATYPES.items():
        if np.dtype(numpy_type) == dtype:
            return name
    raise ValueError(f"no KServe datatype for {dtype}")


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: the input batch and what the client asked of the answer."""

    request_id: str | None
    batch: np.ndarray
    binary_output: bool


def _header(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the body "
                                f"({len(body)} bytes)")
        json_part, binary = body[:n], body[n:]
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("request body must be a JSON object with an 'inputs' list")
    return header, binary


def _shape(entry: dict) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not shape:
        raise ProtocolError("input 'shape' must be a non-empty list of integers")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIMENSION for d in shape):
        raise ProtocolError(f"input 'shape' must hold integers in [0, {MAX_DIMENSION}], got {str(shape)[:60]}")
    return tuple(shape)


def _parameters(part: dict, where: str) -> dict:
    """A part's ``parameters``: absent (or null) is {}, anything else but an object is a 400."""
    parameters = part.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where} 'parameters' must be an object, got {type(parameters).__name__}")
    return parameters


def _flag(parameters: dict, key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} parameter '{key}' must be true or false, got {value!r:.40}")
    return value


def _values(entry: dict, shape: tuple[int, ...], dtype: np.dtype, binary: bytes, offset: int):
    """The input's array and the binary offset after it."""
    count = math.prod(shape)
    size = _parameters(entry, "input").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"binary_data_size {size!r} does not fit the {len(binary) - offset} "
                                "binary bytes left in the body")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"binary_data_size {size} does not match shape {list(shape)} of "
                                f"{dtype} ({count * dtype.itemsize} bytes)")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array, offset + size
    if "data" not in entry:
        raise ProtocolError("input needs 'data' (or binary_data_size with binary data)")
    try:
        array = np.asarray(entry["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"input 'data' must be numbers of datatype {datatype_of(dtype)}: {exc}") from None
    if array.size != count:
        raise ProtocolError(f"input 'data' holds {array.size} values, shape {list(shape)} needs {count}")
    return array.reshape(shape), offset


def _texts(entry: dict, shape: tuple[int, ...], binary: bytes) -> list[str]:
    """BYTES input: JSON strings, or the binary form (each element a 4-byte little-endian length
    then its bytes), one UTF-8 text per row."""
    if len(shape) != 1:
        raise ProtocolError(f"text input shape must be [n], got {list(shape)}")
    size = _parameters(entry, "input").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise ProtocolError(f"binary_data_size {size!r} does not fit the binary data")
        items, offset = [], 0
        while offset < size:
            if offset + 4 > size:
                raise ProtocolError("BYTES binary data is cut short")
            (length,) = struct.unpack_from("<I", binary, offset)
            if offset + 4 + length > size:
                raise ProtocolError("BYTES binary data is cut short")
            items.append(binary[offset + 4 : offset + 4 + length])
            offset += 4 + length
    else:
        items = entry.get("data")
        if not isinstance(items, list):
            raise ProtocolError("text input needs 'data': a list of strings")
    if len(items) != shape[0]:
        raise ProtocolError(f"text input holds {len(items)} strings, shape {list(shape)} needs {shape[0]}")
    try:
        return [i.decode("utf-8") if isinstance(i, bytes) else i for i in items]
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"text input is not UTF-8: {exc}") from None


def decode_infer_request(
    body: bytes,
    header_length: str | None,
    input_name: str,
    input_dtype: np.dtype,
    max_batch: int,
    tokenize: Callable[[list[str]], np.ndarray] | None = None,
) -> InferRequest:
    """Decode an infer request for a model with one input; ProtocolError says what is wrong.

    With ``tokenize`` (text models), the input may also be BYTES: texts, tokenised here.
    """
    header, binary = _header(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"'inputs' must be a list holding one input named '{input_name}'")
    entry = inputs[0]
    expected = datatype_of(input_dtype)
    if tokenize is not None and entry.get("datatype") == "BYTES":
        shape = _shape(entry)
        if shape[0] > max_batch:
            raise ProtocolError(f"batch of {shape[0]} exceeds this gateway's maximum of {max_batch}")
        array = tokenize(_texts(entry, shape, binary))
    else:
        if entry.get("name") != input_name:
            raise ProtocolError(f"unknown input {entry.get('name')!r:.60}: this model's input is '{input_name}'")
        if entry.get("datatype") != expected:
            also = " (or BYTES text)" if tokenize is not None else ""
            raise ProtocolError(f"input datatype must be {expected}{also}, got {entry.get('datatype')!r:.40}")
        shape = _shape(entry)
        if shape[0] > max_batch:
            raise ProtocolError(f"batch of {shape[0]} exceeds this gateway's maximum of {max_batch}")
        array, _ = _values(entry, shape, np.dtype(input_dtype), binary, 0)

    outputs = header.get("outputs")
    outputs = [] if outputs is None else outputs
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("'outputs' must be a list of objects")
    binary_output = False
    for output in outputs:
        if output.get("name") != OUTPUT_NAME:
            raise ProtocolError(f"unknown output {output.get('name')!r:.60}: this model's output is "
                                f"'{OUTPUT_NAME}'")
        binary_output |= _flag(_parameters(output, "output"), "binary_data", "output")
    binary_output |= _flag(_parameters(header, "request"), "binary_data_output", "request")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"request 'id' must be a string, got {type(request_id).__name__}")
    return InferRequest(request_id, array, binary_output)


def encode_infer_response(
    model_name: str,
    request_id: str | None,
    probabilities: np.ndarray,
    parameters: dict,
    binary_output: bool,
) -> tuple[bytes, dict]:
    """The response body and its extra headers (the binary extension's header length)."""
    output = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(probabilities.shape)}
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    if binary_output:
        output["parameters"] = {"binary_data_size": probabilities.nbytes}
    else:
        output["data"] = probabilities.ravel().tolist()
    document = {"model_name": model_name, "model_version": "1", "outputs": [output],
                "parameters": parameters}
    if request_id is not None:
        document["id"] = request_id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary_output:
        return header, {}
    return header + probabilities.tobytes(), {HEADER_LENGTH: str(len(header))}
