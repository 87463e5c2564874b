"""Triton adapter over ``tritonclient.http``: the early-exit backend interface, served by Triton.

The graphs are the repository's ``<name>_full`` and ``<name>_stage1`` … ``<name>_stageN``, one
Triton model per stage of the ladder, chained here stage by stage (see :mod:`targets.serving.triton_repo`). Tensors travel in Triton's binary form. Each thread has its own
client (a pool of ``concurrency`` connections); every call is bounded by ``timeout_s`` (connect and
network timeouts) and any failure
(unreachable, slow, model missing, an answer without the expected outputs) raises
:class:`BackendError` with the server and model named. A batch larger than the repository's
``max_batch_size`` is the client's mistake, not the server's: ``check()`` refuses it with an
:class:`InputError` naming the limit (an HTTP 400, not a retryable 503).
``queue_metrics()`` reads Triton's Prometheus metrics, from which ``congestion()`` derives the
controller's ĉ: Triton's queue time per request over the SLO, and its pending requests.
"""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np

from targets.errors import BackendError, InputError, ModelDirError
from targets.backends.kserve import datatype_of
from targets.model.model_dir import MODEL_NAME, ModelSpec
from targets.backends.ort_target import check_batch, softmax

METRIC_LINE = re.compile(r'^(nv_inference_[a-z_]+)\{([^}]*)\} (\S+)$')


def check_model_name(name: str) -> str:
    """``name`` if it can name a Triton model (and a URL path segment), else ModelDirError."""
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ModelDirError(f"model name {name!r} cannot name a Triton model: use letters, digits, '_', '.' "
                            "and '-' only, starting with a letter or digit (no '/')")
    return name


def triton_model_names(model_name: str, n_stages: int = 2) -> dict[str, str]:
    """Triton model name per graph key: ``full`` and ``stage1`` … ``stage<n_stages>``."""
    check_model_name(model_name)
    keys = ("full", *(f"stage{k}" for k in range(1, n_stages + 1)))
    return {key: f"{model_name}_{key}" for key in keys}


def parse_metrics(text: str, models: set[str]) -> dict[str, dict[str, float]]:
    """Per model: the ``nv_inference_*`` counters and gauges Triton exports (summed over versions)."""
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        model = labels.get("model")
        if model in models:
            metrics = found.setdefault(model, {})
            metrics[match.group(1)] = metrics.get(match.group(1), 0.0) + float(match.group(3))
    return found


class TritonTarget:
    """The early-exit backend interface over a Triton server (see the module docstring)."""

    def __init__(self, spec: ModelSpec, url: str, metrics_url: str | None = None, timeout_s: float = 5.0,
                 concurrency: int = 16):
        try:
            import tritonclient.http as triton_http
        except ImportError as exc:
            raise BackendError("tritonclient is not installed: pip install 'tritonclient[http]'") from exc
        self._http = triton_http
        self.spec = spec
        self.url = url.removeprefix("http://")
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s
        self.names = triton_model_names(spec.name, spec.n_stages)
        self.n_stages = spec.n_stages
        self._concurrency = concurrency
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe: one per thread
        self._clients: list = []
        self._to_probabilities = softmax if spec.outputs_are == "logits" else (lambda p: p)
        for name in self.names.values():
            try:
                ready = self._client().is_model_ready(name)
            except Exception as exc:  # tritonclient raises socket, gevent and its own errors
                raise BackendError(f"Triton at {self.url} is unreachable: {exc}") from exc
            if not ready:
                raise BackendError(f"Triton at {self.url} has no ready model '{name}'")
        self.max_batch_size = self._max_batch_size()
        self.provider = f"triton:{self.url}"
        self._last_metrics: tuple[float, dict] | None = None
        self._metrics_lock = threading.Lock()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._http.InferenceServerClient(self.url, concurrency=self._concurrency,
                                                      connection_timeout=self.timeout_s,
                                                      network_timeout=self.timeout_s)
            self._local.client = client
            self._clients.append(client)
        return client

    def _max_batch_size(self) -> int | None:
        """The smallest ``max_batch_size`` of the three models (None: unknown or unbatched)."""
        sizes = []
        for name in self.names.values():
            try:
                config = self._client().get_model_config(name)
            except Exception as exc:
                raise BackendError(f"Triton at {self.url}: cannot read the config of '{name}': {exc}") from exc
            size = config.get("max_batch_size") if isinstance(config, dict) else None
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                sizes.append(size)
        return min(sizes) if sizes else None

    def check(self, batch) -> np.ndarray:
        batch = check_batch(batch, self.spec)
        if self.max_batch_size is not None and len(batch) > self.max_batch_size:
            raise InputError(f"batch of {len(batch)} rows exceeds the Triton repository's max_batch_size "
                             f"of {self.max_batch_size}: send at most {self.max_batch_size} rows per request")
        return batch

    def _infer(self, key: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        name = self.names[key]
        tensors = []
        for input_name, array in inputs.items():
            array = np.ascontiguousarray(array)
            tensor = self._http.InferInput(input_name, list(array.shape), datatype_of(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        wanted = [self._http.InferRequestedOutput(o, binary_data=True) for o in outputs]
        try:
            result = self._client().infer(name, tensors, outputs=wanted)
            arrays = [result.as_numpy(o) for o in outputs]
        except Exception as exc:
            raise BackendError(f"Triton at {self.url}, model '{name}': {exc}") from exc
        rows = len(next(iter(inputs.values())))
        for output, array in zip(outputs, arrays):
            if not isinstance(array, np.ndarray) or array.ndim < 1 or len(array) != rows:
                got = "nothing" if array is None else f"shape {list(np.shape(array))}"
                raise BackendError(f"Triton at {self.url}, model '{name}': output '{output}' holds {got} "
                                   f"for a batch of {rows}")
        return arrays

    def full_probabilities(self, batch: np.ndarray) -> np.ndarray:
        g = self.spec.full
        (logits,) = self._infer("full", {g.inputs[0]: batch}, g.outputs)
        return self._to_probabilities(logits)

    def stage(self, index: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Stage ``index`` (0-based) of the ladder: ``(exit probabilities, hidden)``, or
        ``(final probabilities, None)`` for the last stage; outputs fetched by name."""
        g = self.spec.stages[index]
        outs = self._infer(f"stage{index + 1}", {g.inputs[0]: x}, g.outputs)
        return self._to_probabilities(outs[0]), (outs[1] if len(outs) == 2 else None)

    def stage1(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.stage(0, batch)

    def stage2(self, hidden: np.ndarray) -> np.ndarray:
        """Final probabilities from stage 1's hidden state (the rest of the ladder)."""
        for index in range(1, self.n_stages):
            probabilities, hidden = self.stage(index, hidden)
        return probabilities

    def predict(self, batch) -> np.ndarray:
        return self.full_probabilities(self.check(batch))

    def queue_metrics(self) -> dict[str, dict[str, float]]:
        """Triton's per-model metrics (needs ``metrics_url``); BackendError when unreadable."""
        if not self.metrics_url:
            raise BackendError("no Triton metrics URL was given")
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except OSError as exc:
            raise BackendError(f"cannot read Triton metrics at {self.metrics_url}: {exc}") from exc
        return parse_metrics(text, set(self.names.values()))

    def congestion(self, slo_ms: float) -> float:
        """ĉ from Triton's queue: mean queue time per request since the previous call over the
        SLO, clipped to [0, 1]; 0 on the first call or when the metrics cannot be read."""
        try:
            now = self.queue_metrics()
        except BackendError:
            return 0.0
        totals = {k: sum(m.get(k, 0.0) for m in now.values())
                  for k in ("nv_inference_queue_duration_us", "nv_inference_request_success")}
        with self._metrics_lock:
            previous, self._last_metrics = self._last_metrics, (time.monotonic(), totals)
        if previous is None:
            return 0.0
        requests = totals["nv_inference_request_success"] - previous[1]["nv_inference_request_success"]
        if requests <= 0:
            return 0.0
        queue_ms = (totals["nv_inference_queue_duration_us"] - previous[1]["nv_inference_queue_duration_us"]) / 1e3
        return min(max(queue_ms / requests / slo_ms, 0.0), 1.0)

    def close(self) -> None:
        for client in self._clients:
            client.close()


class FallbackBackend:
    """``primary`` (e.g. Triton) unless it raises BackendError, then ``fallback`` (e.g. ONNX
    Runtime in-process) for that call; ``fallbacks`` counts how often."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback
        self.provider = f"{primary.provider} (fallback {fallback.provider})"
        self.n_stages = fallback.n_stages  # both serve the same model
        self.fallbacks = 0

    def check(self, batch):
        return self.primary.check(batch)

    def _either(self, method: str, *args):
        try:
            return getattr(self.primary, method)(*args)
        except BackendError:
            self.fallbacks += 1
            return getattr(self.fallback, method)(*args)

    def full_probabilities(self, batch):
        return self._either("full_probabilities", batch)

    def stage(self, index, x):
        return self._either("stage", index, x)

    def stage1(self, batch):
        return self._either("stage1", batch)

    def stage2(self, hidden):
        return self._either("stage2", hidden)
