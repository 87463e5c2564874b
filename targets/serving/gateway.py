"""Path A: a FastAPI gateway serving a controlled target over the KServe v2 / Triton HTTP protocol.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``,
``GET /v2/controller``, ``GET /metrics`` (Prometheus) and ``GET /dashboard`` (live page, see
:mod:`targets.serving.dashboard`).

The event loop moves bytes (and answers a small request itself when nothing else runs). A request's body is read first, within ``body_timeout_s`` of its
arrival (else 408) and up to ``max_body_bytes`` (else 413, after the rest of the body was read and
discarded, so that the client can read the answer); only then does it count as in flight. Its
decoding (JSON, ``np.asarray``, tokenisation), inference and the encoding of the answer run as one
job in a pool of ``max_concurrency`` threads, whose queue holds at most ``max_queue`` jobs (queued
or running; beyond that 503 with Retry-After); when the gateway is otherwise idle (no other
request in flight or queued) and the body is small, the job runs on the event loop instead (and
always, one model run at a time in arrival order, with ``serial_on_loop``: a gateway on one CPU,
where requests queued during a run share the next one, see :mod:`targets.serving.loop_batcher`). Infer
requests are answered by a plain-ASGI lane in front of the framework (:mod:`targets.serving.infer_lane`). The in-flight count and the recent p95 of
in-flight-to-answer latencies are the controller's congestion signal ĉ. Every answer, errors
included, is JSON with a message; bad input is a 4xx, never a 5xx.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from targets.control.audit import Auditor, make_auditor
from targets.control.controlled import ControlledTarget, EarlyExitBackend, Outcome
from targets.control.controller import ACTION_REJECT, ACTION_SHED, BioController
from targets.serving.dashboard import install_dashboard
from targets.errors import BackendError, InputError
from targets.serving.infer_lane import InferLane, Reply, error_reply, request_header
from targets.backends.kserve import HEADER_LENGTH, OUTPUT_NAME, datatype_of, decode_infer_request, encode_infer_response
from targets.serving.live import LABEL_HEADER
from targets.serving.loop_batcher import BatcherCollector, LoopBatcher
from targets.model.model_dir import ModelSpec

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DRAIN_MAX_BYTES = 64 << 20  # an oversized body is read and dropped up to this much, then cut off
_LABEL, _HEADER_LENGTH = LABEL_HEADER.encode(), HEADER_LENGTH.encode()


@dataclass(frozen=True)
class GatewaySettings:
    max_concurrency: int = 4  # worker threads: decoding, inference, encoding
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    max_batch: int = 256
    retry_after_s: int = 1  # Retry-After of a 503 (not admitted, queue full, or the backend failed)
    body_timeout_s: float = 10.0  # the whole body must arrive within this of the request's headers
    max_queue: int = 256  # jobs queued or running in the worker pool; beyond that 503
    # A request runs on the event loop itself, no thread hop, when nothing else is in flight or
    # queued and its body is at most this many bytes (0: always the worker pool).
    inline_max_body_bytes: int = 64 << 10
    # Under load too, small jobs run on the event loop, one at a time in arrival order (waiting ones
    # in flight and in the queue bound): for a gateway on one CPU, where worker threads add
    # hand-offs and no parallelism.
    serial_on_loop: bool = False
    # serial_on_loop: requests queued while the model runs share its next run, up to this many rows
    # (1: one request per run).
    dynamic_batch_rows: int = 32


class PayloadTooLarge(Exception):
    """The body is over the limit; ``more`` says whether some of it is still to arrive."""

    def __init__(self, more: bool = True):
        super().__init__()
        self.more = more


class ClientGone(Exception):
    pass


class QueueFull(Exception):
    pass


class NotIdle(Exception):
    pass


class BoundedExecutor:
    """A thread pool that refuses a job (QueueFull) once ``max_pending`` are queued or running."""

    def __init__(self, workers: int, max_pending: int):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def run_inline(self, fn, *args):
        """Run ``fn`` in the calling thread if no job is queued or running (counted as one while
        it runs); ``NotIdle`` when one is."""
        with self._lock:
            if self._pending:
                raise NotIdle
            self._pending += 1
        try:
            return fn(*args)
        finally:
            self._done(None)

    def reserve(self) -> None:
        """Count a job that will run outside the pool (QueueFull when ``max_pending`` are
        queued or running); ``release()`` when it is done."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull
            self._pending += 1

    def release(self) -> None:
        self._done(None)

    def submit(self, fn, *args) -> Future:
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull
            self._pending += 1
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class _Metrics:
    """The gateway's Prometheus series, in a registry of its own (one per app)."""

    def __init__(self, target: ControlledTarget, in_flight, queue_depth, auditor: Auditor | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("green_mlops_requests", "Infer requests by model, outcome and action",
                                ["model", "outcome", "action"], registry=self.registry)
        self.latency = Histogram("green_mlops_request_latency_seconds",
                                 "End-to-end infer latency (body read to answer)", ["model", "action"],
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        Gauge("green_mlops_in_flight", "Infer requests whose body was read, queued or running",
              registry=self.registry).set_function(in_flight)
        Gauge("green_mlops_queue_depth", "Jobs queued or running in the worker pool",
              registry=self.registry).set_function(queue_depth)
        controller = target.controller
        if controller is not None:
            state = controller.state
            Gauge("green_mlops_tau", "Current threshold tau(t)", registry=self.registry
                  ).set_function(controller.tau)
            Gauge("green_mlops_admission_rate", "Admission rate over the recent window",
                  registry=self.registry).set_function(lambda: state()["admission_rate_recent"] or 0.0)
            Gauge("green_mlops_congestion", "Congestion signal c_hat in [0, 1]",
                  registry=self.registry).set_function(controller.congestion)
            Gauge("green_mlops_energy_norm", "Energy signal e_hat in [0, 1] (0 when unmeasured)",
                  registry=self.registry).set_function(controller.energy_norm)
            budget = controller.budget
            if budget is not None:
                ceiling = Gauge("green_mlops_exit_threshold_ceiling",
                                "Budget policy: the certified ceiling's exit threshold, per exit (1-based)",
                                ["exit"], registry=self.registry)
                for exit_number, value in enumerate(budget.ceiling, start=1):
                    ceiling.labels(exit=str(exit_number)).set(value)
                Gauge("green_mlops_path_level", "Budget policy: the level on the certified path (0 strict, 1 the "
                      "ceiling) of the latest request", registry=self.registry).set_function(lambda: budget.last_level)
                Gauge("green_mlops_path_index", "Budget policy: the certified path's point of the latest request",
                      registry=self.registry).set_function(lambda: budget.last_index)
                Gauge("green_mlops_shed_total", "Budget policy: requests shed (SLO unmet at the ceiling)",
                      registry=self.registry).set_function(lambda: budget.shed)
                Gauge("green_mlops_certificate_void", "Budget policy: 1 once the live audit voided the certificate "
                      "(every request then runs the full model)", registry=self.registry
                      ).set_function(lambda: float(budget.void_reason is not None))
                if auditor is not None:
                    _audit_gauges(self.registry, auditor)
                loop = budget.loop
                if loop is not None:
                    Gauge("green_mlops_slo_p95_target_seconds", "Budget policy: the latency SLO on p95",
                          registry=self.registry).set(loop.slo_p95_ms / 1e3)
                    Gauge("green_mlops_slo_p95_seconds", "Budget policy: the recent p95 the SLO loop saw",
                          registry=self.registry).set_function(lambda: (loop.last_p95_ms or 0.0) / 1e3)
                    Gauge("green_mlops_slo_service_p95_seconds",
                          "Budget policy: the recent p95 of service time (model work, no queueing)",
                          registry=self.registry).set_function(lambda: (loop.last_service_p95_ms or 0.0) / 1e3)
                    Gauge("green_mlops_slo_unreachable_periods",
                          "Budget policy: SLO periods violated by service time alone (shedding cannot help)",
                          registry=self.registry).set_function(lambda: loop.unreachable)
                    Gauge("green_mlops_slo_level", "Budget policy: the SLO loop's level on the certified path",
                          registry=self.registry).set_function(lambda: loop.threshold)
                    Gauge("green_mlops_shed_probability", "Budget policy: the SLO loop's shed probability",
                          registry=self.registry).set_function(lambda: loop.shed_probability)


def _audit_gauges(registry, auditor: Auditor) -> None:
    """The live audit's figures (targets.control.audit); a rate not known yet (no audited row) is NaN."""
    def figure(key):
        def read():
            value = auditor.state()[key]
            return float("nan") if value is None else float(value)
        return read

    for key, text in (("audited", "rows the live audit checked against the full model"),
                      ("disagreed", "audited rows whose served answer differs from the full model's"),
                      ("disagreement", "audited disagreement rate with the full model"),
                      ("disagreement_low", "its anytime-valid lower bound (confidence sequence at the audit's risk)"),
                      ("disagreement_high", "its anytime-valid upper bound"),
                      ("reference", "the validation split's disagreement bound at the points the audited rows ran"),
                      ("e_value", "the sequential test's wealth against 'no more disagreement than on validation' "
                                  "(the certificate is void at 3/audit_risk)"),
                      ("skipped", "sampled rows not audited: the audit queue was full")):
        Gauge(f"green_mlops_audit_{key}", f"Live audit: {text}", registry=registry).set_function(figure(key))


def _audit_parameters(controller) -> dict:
    """The certificate's state as the live audit left it, and the rows it checked (budget policy)."""
    budget = getattr(controller, "budget", None)
    if budget is None:
        return {}
    auditor = getattr(controller, "auditor", None)
    return {"certificate": budget.certificate_state, "audited": auditor.audited if auditor is not None else 0}


def _labels(header: str | None) -> list[int | None] | None:
    """The client's labels (``X-Green-MLOps-Label``, comma-separated), for the audit; a value that
    is not an integer is None (labels are advisory: they never fail a request)."""
    if not header:
        return None
    labels: list[int | None] = []
    for value in header.split(","):
        try:
            labels.append(int(value))
        except ValueError:
            labels.append(None)
    return labels


def _slo_parameters(controller) -> dict:
    """The SLO loop's state when the request was answered: its target, the recent p95 it acted on,
    its exit threshold and shed probability (empty without a budget policy with an SLO)."""
    budget = getattr(controller, "budget", None)
    loop = getattr(budget, "loop", None)
    if loop is None:
        return {}
    return {"slo_p95_ms": loop.slo_p95_ms, "slo_seen_p95_ms": loop.last_p95_ms,
            "slo_service_p95_ms": loop.last_service_p95_ms, "slo_threshold": loop.threshold,
            "shed_probability": loop.shed_probability}


def _decision_parameters(outcomes: list[Outcome], slo: dict | None = None) -> dict:
    """KServe parameters are scalars: one row gives scalars, n rows comma-joined strings.
    ``stage`` is where each row left the ladder (1-based; ``stages`` when it ran the full model);
    ``slo`` (see :func:`_slo_parameters`) is added as it is."""
    return {**_row_parameters(outcomes), **(slo or {})}


def _row_parameters(outcomes: list[Outcome]) -> dict:
    decisions = [o.decision for o in outcomes]
    if decisions[0] is None:
        return {"admitted": True, "action": "full", "controller": "off"}
    if decisions[0].action == ACTION_SHED:  # the whole request was shed before any model work
        return {"admitted": False, "action": ACTION_SHED, "tau": decisions[0].tau,
                "path_index": decisions[0].path_index, "stage": 0}
    stages = outcomes[0].stage if len(outcomes) == 1 else ",".join(str(o.stage) for o in outcomes)
    if len(decisions) == 1:
        d = decisions[0]
        single = {"admitted": d.admitted, "action": d.action, "j": d.j, "tau": d.tau, "u": d.u,
                  "exit": d.exit_index, "stage": stages}
        return single if d.threshold is None else {**single, "threshold": d.threshold, "path_index": d.path_index}
    return {
        "admitted": ",".join("true" if d.admitted else "false" for d in decisions),
        "action": ",".join(d.action for d in decisions),
        "j": ",".join(f"{d.j:.6g}" for d in decisions),
        "tau": ",".join(f"{d.tau:.6g}" for d in decisions),
        "u": ",".join(f"{d.u:.6g}" for d in decisions),
        "exit": ",".join(str(d.exit_index) for d in decisions),
        "stage": stages,
        **({} if decisions[0].threshold is None else
           {"threshold": ",".join(f"{d.threshold:.6g}" for d in decisions),
            "path_index": ",".join(str(d.path_index) for d in decisions)}),
    }


async def _read_body(receive, limit: int) -> bytes:
    """The whole body from the ASGI channel; PayloadTooLarge past ``limit``, ClientGone when the
    client hung up."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(more=bool(message.get("more_body", False)))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _discard_body(receive, timeout_s: float) -> None:
    """Read and drop the rest of a body, for at most ``timeout_s`` and DRAIN_MAX_BYTES: closing a
    connection with unread data makes the kernel answer with a reset, and the client never reads
    our answer."""
    dropped = 0
    try:
        async with asyncio.timeout(max(timeout_s, 0.0)):
            while dropped <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))
    except TimeoutError:
        return


def _declared_length(scope) -> int | None:
    try:
        return int(request_header(scope, b"content-length") or "")
    except ValueError:
        return None


def create_app(
    spec: ModelSpec,
    backend: EarlyExitBackend,
    controller: BioController | None,
    settings: GatewaySettings = GatewaySettings(),
) -> FastAPI:
    """A FastAPI app serving ``backend`` under ``controller`` (None: the standard path). Under the
    budget policy the live audit (targets.control.audit) runs as the controller's config asks."""
    executor = BoundedExecutor(settings.max_concurrency, settings.max_queue)
    auditor = make_auditor(backend, controller)

    @asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown()
        if auditor is not None:
            auditor.stop()

    app = FastAPI(title="green-mlops gateway", docs_url=None, redoc_url=None, lifespan=lifespan)
    # The gateway measures load itself, from the body read to the answer, queueing included.
    target = ControlledTarget(backend, controller, track_load=False, auditor=auditor)
    tokenizer = spec.load_tokenizer()  # text models: BYTES inputs are tokenised here, at the edge
    in_flight = [0]
    answered = [0]
    # serial_on_loop: one model run at a time on the event loop, queued requests merged into it
    batcher = LoopBatcher(target.predict_many, max(1, settings.dynamic_batch_rows))
    app.state.batcher = batcher
    app.state.answered_requests = lambda: answered[0]  # running count, for energy per request
    metrics = _Metrics(target, lambda: in_flight[0], lambda: executor.pending, auditor)
    if settings.serial_on_loop:
        metrics.registry.register(BatcherCollector(batcher))
    n_classes = len(spec.classes)
    metadata = {
        "name": spec.name,
        "versions": ["1"],
        # What runs the stages: a Triton server behind the gateway, or ONNX Runtime in the gateway.
        "platform": "green-mlops/triton" if target.provider.startswith("triton:") else "green-mlops/onnxruntime",
        "inputs": [{"name": spec.input_name, "datatype": datatype_of(spec.input_dtype),
                    "shape": list(spec.input_shape)}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, n_classes]}],
        "parameters": {"classes": ",".join(spec.classes), "provider": target.provider,
                       "controller": "off" if controller is None else "bio", "stages": spec.n_stages},
    }
    if tokenizer is not None:
        metadata["parameters"]["text_input"] = "BYTES, shape [n]: texts, tokenised by the gateway"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):  # a bug, not bad input: still JSON, still logged
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _model_or_404(name: str):
        if name != spec.name:
            return _error(404, f"unknown model '{name}': this gateway serves '{spec.name}'")
        return None

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "green-mlops", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "1"):
        return _model_or_404(name) or metadata

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "1"):
        return _model_or_404(name) or {"name": name, "ready": True}

    @app.get("/v2/controller")
    async def controller_state():
        if controller is None:
            return {"controller": "off"}
        return {"controller": "bio", **controller.state()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def decode(body: bytes, header_length: str | None):
        return decode_infer_request(body, header_length, spec.input_name, spec.input_dtype, settings.max_batch,
                                    tokenizer)

    def respond(decoded, outcomes: list[Outcome]):
        """(outcomes, body, media, headers); no body when the request was rejected or shed."""
        if any(o.action in (ACTION_REJECT, ACTION_SHED) for o in outcomes):
            return outcomes, None, None, None
        probabilities = np.stack([o.probabilities for o in outcomes])
        content, headers = encode_infer_response(spec.name, decoded.request_id, probabilities,
                                                 _decision_parameters(outcomes, {**_slo_parameters(target.controller),
                                                                                 **_audit_parameters(target.controller)}),
                                                 decoded.binary_output)
        media = "application/octet-stream" if decoded.binary_output else "application/json"
        return outcomes, content, media, headers

    def answer(body: bytes, header_length: str | None, service_ms: list[float], labels=None):
        """Worker-thread job: decode, check, predict, encode; (outcomes, body, media, headers).
        ``service_ms[0]`` is set to the model's work (predict), the service time the SLO loop
        tells from queueing."""
        decoded = decode(body, header_length)
        predict_started_ns = time.perf_counter_ns()
        outcomes = target.predict(decoded.batch, labels)
        service_ms[0] = (time.perf_counter_ns() - predict_started_ns) / 1e6
        return respond(decoded, outcomes)

    async def run(body: bytes, header_length: str | None, service_ms: list, labels=None):
        """The answer job, inline on the event loop when the gateway is otherwise idle (no other
        request in flight, none queued, a small body), else in the worker pool. Inline saves the
        two thread hand-offs (measured: most of the overhead above the HTTP floor at concurrency
        1); a request whose body arrived while another ran has counted itself in flight by the
        time this one looks (the yield below), so under load the pool, the queue bound and the
        congestion signal work as before. With ``serial_on_loop`` small jobs always run on the
        loop, through the dynamic batcher (targets.serving.loop_batcher): decoded and checked first (bad
        input fails alone), then merged with the requests queued beside them into one model run."""
        small = len(body) <= settings.inline_max_body_bytes
        if small and settings.serial_on_loop:
            executor.reserve()  # in the queue bound (503 beyond it) and the queue depth
            try:
                decoded = decode(body, header_length)
                batch = target.check(decoded.batch)
                outcomes, service_ms[0] = await batcher.submit(batch, labels)
                return respond(decoded, outcomes)
            finally:
                executor.release()
        if small and in_flight[0] == 1:
            await asyncio.sleep(0)  # let requests already received count themselves in flight
            if in_flight[0] == 1:
                try:
                    return executor.run_inline(answer, body, header_length, service_ms, labels)
                except NotIdle:
                    pass
        return await asyncio.wrap_future(executor.submit(answer, body, header_length, service_ms, labels))

    async def read_body(scope, receive) -> bytes | Reply:
        """The body, or the 408/413 answer (Connection: close) that replaces it."""
        limit, timeout_s = settings.max_body_bytes, settings.body_timeout_s
        started = time.monotonic()
        declared = _declared_length(scope)
        close = {"Connection": "close"}
        too_large = f"request body exceeds {limit} bytes"
        try:
            if declared is not None and declared > limit:
                raise PayloadTooLarge
            async with asyncio.timeout(timeout_s):
                return await _read_body(receive, limit)
        except PayloadTooLarge as exc:
            metrics.requests.labels(spec.name, "too_large", "none").inc()
            expects_continue = "100-continue" in (request_header(scope, b"expect") or "").lower()
            if exc.more and not expects_continue and (declared is None or declared <= DRAIN_MAX_BYTES):
                await _discard_body(receive, timeout_s - (time.monotonic() - started))
            return error_reply(413, too_large, headers=close)
        except TimeoutError:
            metrics.requests.labels(spec.name, "body_timeout", "none").inc()
            return error_reply(408, f"request body not received within {timeout_s:g} s", headers=close)

    async def infer(name: str, scope, receive) -> Reply:
        """POST …/infer, answered by the infer lane (targets.serving.infer_lane), below the framework: the
        path names the model (the version is not checked); never raises for bad input."""
        if name != spec.name:
            # One label for every unknown name: client-chosen labels would grow series without bound.
            metrics.requests.labels("(unknown)", "client_error", "none").inc()
            return error_reply(404, f"unknown model '{name}': this gateway serves '{spec.name}'")
        try:
            body = await read_body(scope, receive)
        except ClientGone:
            metrics.requests.labels(spec.name, "client_gone", "none").inc()
            return Reply(400, b"")  # nobody reads it
        if isinstance(body, Reply):
            return body
        # In flight from here: a body still arriving holds no worker and is no congestion.
        started_ns = time.perf_counter_ns()
        in_flight[0] += 1
        if controller is not None:
            controller.request_started()
        action, outcome_label = "none", "client_error"
        retry = {"Retry-After": str(settings.retry_after_s)}
        service_ms: list[float | None] = [None]
        try:
            try:
                labels = _labels(request_header(scope, _LABEL)) if auditor is not None else None
                outcomes, content, media, headers = await run(body, request_header(scope, _HEADER_LENGTH),
                                                              service_ms, labels)
            except QueueFull:
                outcome_label = "overloaded"
                return error_reply(503, f"gateway busy: {settings.max_queue} requests already queued or "
                                        "running: retry later", headers=retry)
            except InputError as exc:
                return error_reply(400, str(exc))
            except BackendError as exc:
                outcome_label = "backend_error"
                return error_reply(503, f"inference backend unavailable: {exc}", headers=retry)
            action = outcomes[0].action if len(outcomes) == 1 else "batch"
            if content is None and outcomes[0].action == ACTION_SHED:
                outcome_label = "shed"
                return error_reply(503, "request shed: the latency SLO is not met within the accuracy budget: "
                                        "retry later", headers=retry,
                                   parameters=_decision_parameters(outcomes, _slo_parameters(target.controller)))
            if content is None:
                outcome_label = "rejected"
                return error_reply(503, "request not admitted by the controller: retry later", headers=retry,
                                   parameters=_decision_parameters(outcomes, _slo_parameters(target.controller)))
            outcome_label = "ok"
            answered[0] += 1
            return Reply(200, content, media, headers)
        except Exception:
            outcome_label = "server_error"
            raise
        finally:
            in_flight[0] -= 1
            latency_s = (time.perf_counter_ns() - started_ns) / 1e9
            served = outcome_label in ("ok", "rejected")  # bad input says nothing of the load
            if controller is not None:
                controller.request_finished(latency_s * 1e3 if served else None, service_ms[0])
            metrics.requests.labels(spec.name, outcome_label, action).inc()
            if served:
                metrics.latency.labels(spec.name, action).observe(latency_s)

    live_state = install_dashboard(app, spec, controller, target.provider, metrics.registry)  # /dashboard
    # Outermost: infer requests never enter the framework's middleware, routing or exception handling.
    app.add_middleware(InferLane, handle=infer, observe=live_state.observe)
    return app
