"""Locust machinery shared by ``loadtests/bio.py`` and ``loadtests/standard.py``.

* With no ``--host`` the locustfile starts the gateway itself (``green-mlops serve`` on an
  ephemeral loopback port, controller on for bio, off for standard) and stops it at the end.
  ``--backend triton --host URL`` drives a Triton server directly (its ``<model>_full``).
* Users send rows of the model's labelled evaluation set, so every answer is scored; each request
  carries its row's label in the ``X-Green-MLOps-Label`` header, so the gateway's live dashboard
  can show the running accuracy (the controller never reads it).
* ``--shape`` picks a congestion pattern (:mod:`loadtests.shapes`); ``--arrival-rate R`` switches
  to open loop: Poisson arrivals at R requests/s (scaled by the shape), each sent on schedule in
  its own greenlet whether or not earlier ones returned, latency measured from the intended send
  time, sends that left late counted.
* Every request is recorded to ``RESULTS/requests.jsonl`` (flushed per line); workers ship their
  records to the master, which writes the one merged file. ``run.json`` holds the metadata;
  ``windows.jsonl`` and ``timeline.jsonl`` the energy; a rich per-phase summary prints at the end.
"""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import gevent
from gevent.pool import Group
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtests.records import RUN_FILE, RecordWriter
from reports.records import phase_summary, read_records
from loadtests.shapes import SHAPES, Shape, ShapeParams
from targets.live import LABEL_HEADER

RECORDS_MESSAGE = "green_mlops_records"
SHIP_EVERY_S = 0.2
GRACEFUL_STOP_S = 10.0
ARRIVAL_SLICE_S = 0.25  # an open-loop generator yields this often, so it can stop gracefully


class _Run:
    """This process's state: the scenario, the data, the writer (local or master), the gateway."""

    def __init__(self):
        self.scenario = "bio"
        self.gateway = None  # the gateway this locustfile started, if it started one
        self.writer: RecordWriter | None = None  # local runner or master only
        self.results_dir: Path | None = None
        self.started_s: float | None = None
        self.data = None  # (model name, request bodies, labels)
        self.outbox: list[dict] = []  # a worker's records not yet shipped to the master
        self.shipper = None
        self.profiler = None
        self.energy_feed = None
        self.sampler = None
        self.metadata: dict = {}


RUN = _Run()


def configure(scenario: str) -> None:
    """Called by the locustfile: ``bio`` (controller on) or ``standard`` (controller off)."""
    RUN.scenario = scenario


# --- command line ---------------------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def _arguments(parser):
    group = parser.add_argument_group("green-mlops")
    group.add_argument("--model", default="digits", help="embedded model name or model directory")
    group.add_argument("--shape", default="steady", choices=SHAPES, help="congestion pattern")
    group.add_argument("--base-users", type=int, default=0, help="steady load (default: -u, else 10)")
    group.add_argument("--peak-users", type=int, default=0, help="top of ramp/wave/step (default 2 x base)")
    group.add_argument("--spike-multiple", type=float, default=4.0, help="spike: sudden multiple of base")
    group.add_argument("--phase-s", type=float, default=10.0, help="length of one phase, seconds")
    group.add_argument("--steps", type=int, default=3, help="step: number of steps")
    group.add_argument("--arrival-rate", type=float, default=0.0,
                       help="open loop: Poisson arrivals per second at base load (0: closed loop)")
    group.add_argument("--open-loop-users", type=int, default=1,
                       help="open loop: arrival generators sharing the rate (>= number of workers)")
    group.add_argument("--late-ms", type=float, default=1.0, help="open loop: a send this late counts as late")
    group.add_argument("--results", default="", help="results directory (default results/<UTC>-<scenario>/)")
    group.add_argument("--energy", default="auto", choices=("auto", "off"), help="energy profilers")
    group.add_argument("--country", default="USA", help="ISO alpha-3 code for CodeCarbon's CO2 intensity")
    group.add_argument("--controller-config", default="",
                       help="TOML [controller] file for the gateway the locustfile starts")
    group.add_argument("--backend", default="gateway", choices=("gateway", "triton"),
                       help="what --host is: the green-mlops gateway, or a Triton server (its <model>_full)")


def _options(environment):
    return environment.parsed_options


def _shape_of(options) -> Shape:
    base = options.base_users or options.num_users or 10
    params = ShapeParams(base_users=base, peak_users=options.peak_users or 2 * base,
                         spike_multiple=options.spike_multiple, phase_s=options.phase_s,
                         steps=options.steps, run_time_s=options.run_time or None)
    return Shape(options.shape, params)


# --- set-up and tear-down ---------------------------------------------------------------------------
@events.init.add_listener
def _init(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        return  # workers learn the host and options from the master's spawn message
    options = _options(environment)
    if options is None:  # used as a library without a command line: nothing to set up
        return
    try:
        _shape_of(options)  # bad shape parameters fail here, before anything starts
    except ValueError as exc:
        raise SystemExit(f"green-mlops: {exc}") from None
    if options.backend == "triton" and not environment.host:
        raise SystemExit("--backend triton drives a running Triton server: give its address with --host")
    if not environment.stop_timeout:
        # Let users finish the request in hand when the run ends, so that every request the
        # gateway answered is recorded (Locust would otherwise kill them mid-request).
        environment.stop_timeout = GRACEFUL_STOP_S
    if not environment.host:
        from loadtests.gateway_process import GatewayProcess

        extra = ("--config", options.controller_config) if options.controller_config else ()
        RUN.gateway = GatewayProcess("--model", options.model,
                                     "--controller", "bio" if RUN.scenario == "bio" else "off", *extra)
        environment.host = RUN.gateway.url
        print(f"green-mlops: {RUN.scenario} gateway at {RUN.gateway.url} · dashboard {RUN.gateway.dashboard_url}",
              file=sys.stderr, flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RUN.results_dir = Path(options.results or f"results/{stamp}-{RUN.scenario}")
    RUN.writer = RecordWriter(RUN.results_dir)
    if isinstance(environment.runner, MasterRunner):
        environment.runner.register_message(RECORDS_MESSAGE, lambda msg, **kw: RUN.writer.write(msg.data))
    if options.energy == "auto":
        from profilers.feed import PeriodicEnergyFeed
        from profilers.profiler import Sampler, open_profiler

        RUN.profiler = open_profiler(country_iso_code=options.country,
                                     record_path=RUN.results_dir / "windows.jsonl")
        if RUN.profiler.sources:
            RUN.energy_feed = PeriodicEnergyFeed(RUN.profiler, None, lambda: RUN.writer.count, 1.0)
            RUN.sampler = Sampler(RUN.profiler, 10.0, RUN.results_dir / "timeline.jsonl")


@events.test_start.add_listener
def _test_start(environment, **_):
    RUN.started_s = time.time()
    if isinstance(environment.runner, WorkerRunner):
        RUN.shipper = gevent.spawn(_ship_forever, environment)
        return
    if RUN.writer is None:
        return
    if RUN.energy_feed is not None and not RUN.energy_feed.running:
        RUN.energy_feed.start()
        RUN.sampler.start()
    options = _options(environment)
    RUN.metadata = {
        "scenario": RUN.scenario,
        "backend": options.backend,
        "controller": "off" if options.backend == "triton" else "bio" if RUN.scenario == "bio" else "off",
        "host": environment.host,
        "gateway_started_by_locustfile": RUN.gateway is not None,
        "model": options.model,
        "shape": options.shape,
        "shape_params": vars(_shape_of(options).p),
        "open_loop": options.arrival_rate > 0,
        "arrival_rate_rps": options.arrival_rate or None,
        "started_at": datetime.now(UTC).isoformat(),
        "energy_sources": RUN.profiler.source_labels() if RUN.profiler else [],
        "energy_unavailable": RUN.profiler.unavailable if RUN.profiler else {},
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        **_served_model(environment.host, _served_name(options)),
    }
    _write_metadata()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("green-mlops", "locust", "onnxruntime", "onnxruntime-gpu", "numpy", "codecarbon"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _served_model(host: str, name: str) -> dict:
    """What the server says of the model it serves (the gateway names its provider)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{host}/v2/models/{name}", timeout=5) as response:
            metadata = json.load(response)
        provider = metadata.get("parameters", {}).get("provider") or f"triton:{metadata.get('platform')}"
        return {"provider": provider, "served_model": metadata}
    except (OSError, ValueError) as exc:
        return {"provider": None, "served_model_error": str(exc)}


def _write_metadata() -> None:
    (RUN.results_dir / RUN_FILE).write_text(json.dumps(RUN.metadata, indent=2) + "\n")


def _ship_forever(environment) -> None:
    while True:
        gevent.sleep(SHIP_EVERY_S)
        _ship(environment)


def _ship(environment) -> None:
    if RUN.outbox:
        batch, RUN.outbox = RUN.outbox, []
        environment.runner.send_message(RECORDS_MESSAGE, batch)


@events.test_stop.add_listener
def _test_stop(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        _ship(environment)


@events.quitting.add_listener
def _quitting(environment, **_):
    if RUN.writer is None:
        return
    if isinstance(environment.runner, MasterRunner):
        gevent.sleep(2 * SHIP_EVERY_S)  # the workers' last shipment
    for part in (RUN.energy_feed, RUN.sampler):
        if part is not None and part.running:
            part.stop()
    if RUN.profiler is not None:
        RUN.profiler.close()
    RUN.writer.close()
    if RUN.gateway is not None:
        RUN.gateway.stop()
    records = read_records(RUN.writer.path)
    rows = phase_summary(records)
    RUN.metadata.update(ended_at=datetime.now(UTC).isoformat(), n_records=len(records),
                        phases=rows, **_energy_totals(len(records)))
    _write_metadata()
    _print_summary(rows)


def _energy_totals(n_records: int) -> dict:
    path = RUN.results_dir / "windows.jsonl"
    if not path.exists() or n_records == 0:
        return {"energy_per_request_j": None, "energy_source": "none"}
    windows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    read = [w for w in windows if w["energy_j"] is not None]  # measured or estimated, as labelled
    if not read:
        return {"energy_per_request_j": None, "energy_source": "none"}
    return {"energy_per_request_j": sum(w["energy_j"] for w in read) / n_records,
            "energy_source": read[-1]["energy_source"]}


def _print_summary(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value, spec=".2f"):
        return "–" if value is None else format(value, spec)

    table = Table(title=f"green-mlops {RUN.scenario} · {RUN.metadata.get('shape')} · "
                        f"{'open loop' if RUN.metadata.get('open_loop') else 'closed loop'} · latency ms")
    for name in ("phase", "n", "req/s", "p50", "p95", "p99", "admit", "acc", "rej", "late"):
        table.add_column(name, justify="left" if name == "phase" else "right")
    for r in rows:
        table.add_row(r["phase"], str(r["n"]), fmt(r["throughput_rps"], ".1f"), fmt(r["p50_ms"]),
                      fmt(r["p95_ms"]), fmt(r["p99_ms"]), fmt(r["admission_rate"], ".1%"),
                      fmt(r["accuracy"], ".1%"), str(r["rejected"]), str(r["late"]))
    console = Console(stderr=True)
    console.print(table)
    console.print(f"records: {RUN.writer.path}", soft_wrap=True)


# --- users ------------------------------------------------------------------------------------------
def _served_name(options) -> str:
    """The model's name on the server: the gateway serves it as is, Triton as ``<name>_full``."""
    from green_mlops.models import resolve_model

    name = resolve_model(options.model).name
    return f"{name}_full" if options.backend == "triton" else name


def _load_data(options):
    """JSON bodies for every evaluation row (encoded once) and their labels."""
    if RUN.data is None:
        from green_mlops.models import resolve_model

        from targets.kserve import datatype_of

        spec = resolve_model(options.model)
        x, y = spec.load_eval()
        datatype = datatype_of(spec.input_dtype)
        bodies = [json.dumps({"inputs": [{"name": spec.input_name, "shape": [1, *x.shape[1:]],
                                          "datatype": datatype, "data": row.ravel().tolist()}]}).encode()
                  for row in x]
        RUN.data = (spec.name, bodies, [int(v) for v in y])
    return RUN.data


class _InferUser(FastHttpUser):
    abstract = True
    concurrency = 64  # connections per user: open-loop sends overlap

    def on_start(self):
        options = _options(self.environment)
        _, self.bodies, self.labels = _load_data(options)
        self.path = f"/v2/models/{_served_name(options)}/infer"
        self.rng = random.Random()
        self.shape = _shape_of(options)
        self.source = getattr(self.environment.runner, "client_id", "local")

    def send(self, intended_s: float | None) -> None:
        """Send one random evaluation row; record it. ``intended_s``: open-loop schedule time."""
        index = self.rng.randrange(len(self.bodies))
        sent_s = time.time()
        started = time.perf_counter()
        with self.client.post(self.path, data=self.bodies[index], name="infer", catch_response=True,
                              headers={"Content-Type": "application/json",
                                       LABEL_HEADER: str(self.labels[index])}) as response:
            service_ms = (time.perf_counter() - started) * 1e3
            status = response.status_code or 0
            if status in (200, 503):
                response.success()  # a 503 is the controller's rejection, not a failure
            answer = _parse(response.content) if status in (200, 503) else {}
        parameters = answer.get("parameters", {})
        predicted = answer.get("predicted")
        label = self.labels[index]
        t_ref = intended_s if intended_s is not None else sent_s
        record = {
            "t_intended": t_ref,
            "t_sent": sent_s,
            "latency_ms": (sent_s - t_ref) * 1e3 + service_ms,
            "service_ms": service_ms,
            "late": intended_s is not None and (sent_s - intended_s) * 1e3 > _options(self.environment).late_ms,
            "status": status,
            "admitted": parameters.get("admitted", status == 200) if status == 200 else False,
            "action": parameters.get("action", "reject" if status == 503 else "full" if status == 200 else None),
            "correct": predicted == label if status == 200 else False,
            "label": label,
            "predicted": predicted,
            "tau": parameters.get("tau"),
            "u": parameters.get("u"),
            "phase": self.shape.phase_at(t_ref - (RUN.started_s or t_ref)),
            "row": index,
            "source": self.source,
        }
        if RUN.writer is not None and not isinstance(self.environment.runner, WorkerRunner):
            RUN.writer.write([record])
        else:
            RUN.outbox.append(record)


def _parse(content: bytes | None) -> dict:
    try:
        document = json.loads(content or b"{}")
    except ValueError:
        return {}
    outputs = document.get("outputs") or []
    if outputs and outputs[0].get("data"):
        data = outputs[0]["data"]
        document["predicted"] = max(range(len(data)), key=data.__getitem__)
    return document


class ClosedLoopUser(_InferUser):
    """Sends the next request as soon as the previous one is answered."""

    wait_time = constant(0)

    @task
    def infer(self):
        self.send(None)


class OpenLoopUser(_InferUser):
    """Poisson arrivals at ``arrival_rate / open_loop_users`` per second, scaled by the shape."""

    wait_time = constant(0)

    def on_start(self):
        super().on_start()
        self.inflight = Group()
        self.next_s = time.time()

    def on_stop(self):
        self.inflight.join(timeout=GRACEFUL_STOP_S)

    @task
    def arrivals(self):
        """Issue the arrivals of the next slice of time, each in its own greenlet."""
        options = _options(self.environment)
        rate = options.arrival_rate / max(options.open_loop_users, 1)
        slice_end = time.time() + ARRIVAL_SLICE_S
        while self.next_s < slice_end:
            delay = self.next_s - time.time()
            if delay > 0:
                gevent.sleep(delay)
            self.inflight.spawn(self.send, self.next_s)
            factor = self.shape.load_factor(self.next_s - (RUN.started_s or self.next_s))
            self.next_s += self.rng.expovariate(rate * factor)


class CongestionShape(LoadTestShape):
    """The ``--shape`` pattern; closed-loop users, or open-loop generators with ``--arrival-rate``.
    Reads ``-u`` and ``-t`` (a pattern ends at ``-t``, else at its natural length)."""

    use_common_options = True

    def tick(self):
        options = self.runner.environment.parsed_options
        shape = _shape_of(options)
        t = self.get_run_time()
        if t >= shape.end_s:
            return None
        if options.arrival_rate > 0:
            users = max(options.open_loop_users, 1)
            return users, users, [OpenLoopUser]
        users = shape.users_at(t)
        return users, max(users, 1) * 10, [ClosedLoopUser]
