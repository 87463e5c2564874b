"""Locust machinery shared by ``loadtests/bio.py`` and ``loadtests/standard.py``.

* With no ``--host`` the locustfile starts the gateway itself (``green-mlops serve`` on an
  ephemeral loopback port, controller on for bio, off for standard; with ``--energy auto`` the
  gateway runs its own energy profiler, so bio's controller is fed ê) and stops it at the end.
  ``--backend triton --host URL`` drives a Triton server directly: ``<model>_full`` for standard,
  ``<model>_bio`` (the ladder and its controller inside Triton, ``green-mlops triton repo --bio``)
  for bio; a row the bio model refused (shed, rejected) is recorded as ``rejected``, as the
  gateway's 503 is.
* Each request carries its row's label in the ``X-Green-MLOps-Label`` header, so the gateway's
  live dashboard can show the running accuracy (the controller never reads it).
* The model is checked at start (one message and exit 2 for a model that cannot be loaded); its
  *reference answers* (full and exit answer, exit uncertainty, per evaluation row) are computed
  once and written to ``reference.json``, so every request is paired with the full model's answer
  for the same row.
* ``--arrival-rate R`` runs open loop: a seeded schedule of Poisson arrival times *and* rows
  (:mod:`loadtests.schedule`; ``--seed``, or ``--schedule FILE`` to replay one) is replayed, each
  arrival sent at its time whether or not earlier ones returned. Latency is measured from the
  intended time; ``late`` from the intended time to the moment the request is on the wire (a
  connection of the pool acquired), so waiting for a connection counts. Without it, closed loop.
* Every request that was sent ends as exactly one record in ``requests.jsonl``: ``answered``,
  ``rejected`` (the controller's 503), ``failed`` (any other status, a timeout, a refused or
  reset connection, with its reason) or ``cut_off`` (still in flight, or not yet on the wire,
  when the run ended). Workers ship their records to the master, which writes the one file.
  The writer closes last, after every user and in-flight request has ended.
* SIGINT and SIGTERM stop the run the same way: users finish the request in hand (bounded), the
  rest is recorded as cut off, ``run.json`` is finished, the gateway stopped.
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import gevent
import numpy as np
from gevent.event import Event
from gevent.pool import Pool
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from loadtests.answers import outcome_of
from loadtests.answers import parse_answer as _parse
from loadtests.records import RUN_FILE, RecordWriter
from loadtests.runner import CPU_SETS_ENV
from loadtests.schedule import (SCHEDULE_FILE, Schedule, ScheduleError, load_schedule, make_schedule,
                                schedule_document, schedule_from_document)
from loadtests.shapes import SHAPES, Shape, ShapeParams, spawn_rate
from reports.records import phase_summary, read_records
from targets.serving.live import LABEL_HEADER

RECORDS_MESSAGE = "green_mlops_records"
SHIP_EVERY_S = 0.2
GRACEFUL_STOP_S = 10.0  # users finish the request in hand within this, then are cut off
ARRIVAL_SLICE_S = 0.25  # an open-loop generator yields this often, so it can stop gracefully
EXIT_USAGE = 2

# When each greenlet's request got its connection (went on the wire), by greenlet id.
_WIRE_S: dict[int, float] = {}


def _stamp_connection_acquisition() -> None:
    """Record when a pooled connection is handed to a request: the request is then on the wire.
    (FastHttpUser's pool blocks a request until a connection is free; that wait is lateness.)"""
    from geventhttpclient.connectionpool import ConnectionPool

    if getattr(ConnectionPool.get_socket, "_green_mlops", False):
        return
    original = ConnectionPool.get_socket

    def get_socket(self):
        sock = original(self)
        _WIRE_S[id(gevent.getcurrent())] = time.time()
        return sock

    get_socket._green_mlops = True
    ConnectionPool.get_socket = get_socket


_stamp_connection_acquisition()


class _Run:
    """This process's state: the scenario, the data, the writer (local or master), the gateway."""

    def __init__(self):
        self.scenario = "bio"
        self.gateway = None  # the gateway this locustfile started, if it started one
        self.cpu_sets: dict | None = None  # {"load_generator": "0", "gateway": "1"} when pinned
        self.writer: RecordWriter | None = None  # local runner or master only
        self.results_dir: Path | None = None
        self.started_s: float | None = None
        self.data = None  # (model name, request bodies, labels)
        self.drifted_bodies = None  # --drift-at-s: the same rows with noise planted
        self.schedule: Schedule | None = None
        self.spawn_rate: float | None = None  # -r as given (None: the shape's own)
        self.outbox: list[dict] = []  # a worker's records not yet shipped to the master
        self.workers: list[dict] = []  # master, open loop: each worker's share of the schedule, as it said
        self.pending: dict[int, dict] = {}  # records of requests not yet ended, by id
        self.shipper = None
        self.profiler = None
        self.energy_feed = None
        self.sampler = None
        self.metadata: dict = {}
        self.finishing = False
        self.interrupted = False
        self.finished = Event()
        self.schedule_ready = Event()  # a worker: the master's schedule arrived
        self.share_said = False  # a worker: told the master which schedule it replays


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
    group.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival schedule (times and rows)")
    group.add_argument("--schedule", default="",
                       help="open loop: replay this schedule.json (from an earlier run) instead of drawing one")
    group.add_argument("--open-loop-users", type=int, default=1,
                       help="open loop: arrival generators sharing the schedule (>= number of workers)")
    group.add_argument("--late-ms", type=float, default=10.0,
                       help="open loop: a request on the wire this long after its intended time is late")
    group.add_argument("--request-timeout-s", type=float, default=10.0,
                       help="a request unanswered after this long fails (reason: timeout)")
    group.add_argument("--results", default="", help="results directory (default results/<UTC>-<scenario>/)")
    group.add_argument("--energy", default="auto", choices=("auto", "off"), help="energy profilers")
    group.add_argument("--country", default="USA", help="ISO alpha-3 code for CodeCarbon's CO2 intensity")
    group.add_argument("--controller-config", default="",
                       help="TOML [controller] file for the gateway the locustfile starts")
    group.add_argument("--drift-at-s", type=float, default=-1.0,
                       help="planted drift: from this many seconds into the run, every row is sent with Gaussian "
                            "noise added (tensor inputs; default -1: no drift)")
    group.add_argument("--drift-noise", type=float, default=1.0,
                       help="planted drift: the noise's standard deviation, in units of each input feature's "
                            "standard deviation over the evaluation rows (seeded by --seed)")
    group.add_argument("--backend", default="gateway", choices=("gateway", "triton"),
                       help="what --host is: the green-mlops gateway, or a Triton server (its <model>_full for "
                            "standard, <model>_bio for bio: 'green-mlops triton repo --bio')")


def _options(environment):
    return environment.parsed_options


def _shape_of(options) -> Shape:
    base = options.base_users or options.num_users or 10
    params = ShapeParams(base_users=base, peak_users=options.peak_users or 2 * base,
                         spike_multiple=options.spike_multiple, phase_s=options.phase_s,
                         steps=options.steps, run_time_s=options.run_time or None)
    return Shape(options.shape, params)


def _exit_usage(message: str):
    """One line to the user and exit 2, before anything starts (no traceback)."""
    import sys

    print(f"green-mlops: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


# --- set-up and tear-down ---------------------------------------------------------------------------
@events.init.add_listener
def _init(environment, **_):
    options = _options(environment)
    if options is None:  # used as a library without a command line: nothing to set up
        return
    if options.request_timeout_s <= 0:
        _exit_usage("--request-timeout-s must be > 0")
    _InferUser.network_timeout = _InferUser.connection_timeout = options.request_timeout_s
    if environment.runner is not None:
        _quit_after_graceful_stop(environment.runner)
    if isinstance(environment.runner, WorkerRunner):
        # Workers learn the host from the master's spawn message, and the schedule from the master
        # itself: never re-drawn here, where options such as -t are not the master's.
        environment.runner.register_message(SCHEDULE_MESSAGE, _receive_schedule)
        return
    RUN.spawn_rate = options.spawn_rate  # None unless -r was given (Locust defaults it later)
    try:
        shape = _shape_of(options)  # bad shape parameters fail here, before anything starts
    except ValueError as exc:
        _exit_usage(str(exc))
    if options.backend == "triton" and not environment.host:
        _exit_usage("--backend triton drives a running Triton server: give its address with --host")
    spec = _resolve(options.model)
    if options.arrival_rate < 0:
        _exit_usage("--arrival-rate must be >= 0")
    if options.drift_at_s >= 0 and spec.is_text:
        _exit_usage(f"--drift-at-s plants noise in tensor inputs; model {spec.name} takes text")
    if options.drift_at_s >= 0 and not (options.drift_noise > 0 and math.isfinite(options.drift_noise)):
        _exit_usage("--drift-noise must be a finite number > 0")
    if options.schedule and options.arrival_rate <= 0:
        _exit_usage("--schedule replays an open-loop schedule: give --arrival-rate too (or use --arrival-rate "
                    "with the schedule's own rate)")
    if not environment.stop_timeout:
        # Let users finish the request in hand when the run ends, so that every request the
        # gateway answered is recorded (Locust would otherwise kill them mid-request).
        environment.stop_timeout = GRACEFUL_STOP_S
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RUN.results_dir = Path(options.results or f"results/{stamp}-{RUN.scenario}")
    try:
        RUN.results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _exit_usage(f"cannot create results directory {RUN.results_dir}: {exc}")
    x, _ = _load_eval(spec)
    if options.arrival_rate > 0:
        RUN.schedule = _schedule(options, shape, len(x))
        RUN.schedule.save(RUN.results_dir / SCHEDULE_FILE)
    from loadtests.reference import reference_answers, write_reference

    write_reference(RUN.results_dir, reference_answers(spec))
    if not environment.host:
        from loadtests.gateway_process import GatewayProcess

        from targets.cpus import cpu_list, split_for_load_test

        extra = ("--config", options.controller_config) if options.controller_config else ()
        # Locust and the gateway on disjoint CPUs where there are two or more (the gateway's ONNX
        # Runtime threads follow its share): the load generator must not take the server's cores.
        split = split_for_load_test()
        RUN.gateway = GatewayProcess("--model", options.model, "--energy", options.energy,
                                     "--controller", "bio" if RUN.scenario == "bio" else "off", *extra,
                                     cpus=split[1] if split else None)
        if split is not None:
            os.sched_setaffinity(0, split[0])
            RUN.cpu_sets = {"load_generator": cpu_list(split[0]), "gateway": cpu_list(split[1])}
        environment.host = RUN.gateway.url
        print(f"green-mlops: {RUN.scenario} gateway at {RUN.gateway.url} · dashboard {RUN.gateway.dashboard_url}",
              file=sys.stderr, flush=True)
    elif os.environ.get(CPU_SETS_ENV):  # a server the caller started and pinned (validate --backend triton)
        RUN.cpu_sets = json.loads(os.environ[CPU_SETS_ENV])
    RUN.writer = RecordWriter(RUN.results_dir)
    if isinstance(environment.runner, MasterRunner):
        environment.runner.register_message(RECORDS_MESSAGE, lambda msg, **kw: RUN.writer.write(msg.data))
        environment.runner.register_message(WORKER_MESSAGE, lambda msg, **kw: RUN.workers.append(msg.data))
    if options.energy == "auto":
        from profilers.feed import PeriodicEnergyFeed
        from profilers.profiler import Sampler, open_profiler

        RUN.profiler = open_profiler(country_iso_code=options.country,
                                     record_path=RUN.results_dir / "windows.jsonl")
        if RUN.profiler.sources:
            RUN.energy_feed = PeriodicEnergyFeed(RUN.profiler, None, lambda: RUN.writer.count, 1.0)
            RUN.sampler = Sampler(RUN.profiler, 10.0, RUN.results_dir / "timeline.jsonl")
    # SIGINT and SIGTERM take one path: a gevent handler that interrupts Locust's main greenlet
    # where it waits. Python's own SIGINT handler raises KeyboardInterrupt in whichever greenlet
    # happens to run (a user mid-request, whose answered request is then lost, the shape or the
    # hub); and Locust installs its SIGTERM handler only once a headless shape run is over, so
    # until then SIGTERM killed the process outright, run.json unfinished.
    gevent.signal_handler(signal.SIGINT, _interrupt)
    gevent.signal_handler(signal.SIGTERM, _interrupt)


def _quit_after_graceful_stop(runner) -> None:
    """Locust's ``-t`` timer calls ``runner.quit()`` while the shape's own end may be stopping the
    users gracefully; quit's second ``stop()`` then finds no user left to wait for and kills the
    users with their request in hand. Make quit wait for a stop in progress first (bounded)."""
    quit_now = runner.quit

    def quit() -> None:
        deadline = time.monotonic() + GRACEFUL_STOP_S + 2
        while runner.state in ("cleanup", "stopping") and time.monotonic() < deadline:
            gevent.sleep(0.05)
        quit_now()

    runner.quit = quit


def _interrupt() -> None:
    """Ctrl-C or SIGTERM: interrupt Locust's main greenlet where it waits, as Locust expects of
    Ctrl-C; once only (a second signal, or the one a parent passes on, must not break the
    graceful stop)."""
    if RUN.interrupted or RUN.finishing:
        return
    RUN.interrupted = True
    gevent.get_hub().parent.throw(KeyboardInterrupt())


def _resolve(model: str):
    from targets.errors import GreenMLOpsError
    from targets.model.registry import resolve_model

    try:
        return resolve_model(model)
    except (GreenMLOpsError, OSError, ValueError, KeyError) as exc:
        _exit_usage(f"cannot load model {model}: {exc}")


def _load_eval(spec):
    try:
        return spec.load_eval()
    except Exception as exc:  # any reason the evaluation set is unreadable: one line, exit 2
        _exit_usage(f"cannot read the evaluation set of model {spec.name}: {exc}")


def _schedule(options, shape: Shape, n_rows: int) -> Schedule:
    try:
        if options.schedule:
            return load_schedule(Path(options.schedule), n_rows)
        return make_schedule(options.arrival_rate, shape, n_rows, options.seed)
    except ScheduleError as exc:
        _exit_usage(str(exc))


def _receive_schedule(msg, **_) -> None:
    """A worker: the master's schedule, the one every worker replays its share of."""
    try:
        RUN.schedule = schedule_from_document(msg.data)
    except ScheduleError as exc:
        print(f"green-mlops: the master's schedule is unreadable: {exc}", file=sys.stderr, flush=True)
        return
    RUN.schedule_ready.set()


@events.test_start.add_listener
def _test_start(environment, **_):
    RUN.started_s = time.time()
    if isinstance(environment.runner, WorkerRunner):
        RUN.shipper = gevent.spawn(_ship_forever, environment)
        return
    if RUN.writer is None:
        return
    if isinstance(environment.runner, MasterRunner) and RUN.schedule is not None:
        # Sent before Locust's spawn messages (test_start fires first), on the same connection.
        environment.runner.send_message(SCHEDULE_MESSAGE, schedule_document(RUN.schedule))
    if RUN.energy_feed is not None and not RUN.energy_feed.running:
        RUN.energy_feed.start()
        RUN.sampler.start()
    options = _options(environment)
    RUN.metadata = {
        "scenario": RUN.scenario,
        "backend": options.backend,
        "controller": "bio" if RUN.scenario == "bio" else "off",
        "controller_home": ("none" if RUN.scenario != "bio" else
                            "triton (<model>_bio)" if options.backend == "triton" else "gateway"),
        "host": environment.host,
        "gateway_started_by_locustfile": RUN.gateway is not None,
        "model": options.model,
        "shape": options.shape,
        "shape_params": vars(_shape_of(options).p),
        "open_loop": options.arrival_rate > 0,
        "arrival_rate_rps": options.arrival_rate or None,
        "schedule": RUN.schedule.describe() if RUN.schedule else None,
        "late_ms": options.late_ms,
        "request_timeout_s": options.request_timeout_s,
        "started_at": datetime.now(UTC).isoformat(),
        "finished": False,
        "energy_sources": RUN.profiler.source_labels() if RUN.profiler else [],
        "energy_unavailable": RUN.profiler.unavailable if RUN.profiler else {},
        "gateway_energy": options.energy if RUN.gateway is not None else "unknown (not started here)",
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "cpu_sets": RUN.cpu_sets or ("shared: Locust and the gateway not pinned" if RUN.gateway
                                                 else "the gateway not started here")},
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


def _get_json(url: str) -> dict | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def _served_model(host: str, name: str) -> dict:
    """What the server says of the model it serves (the gateway names its provider)."""
    metadata = _get_json(f"{host}/v2/models/{name}")
    if metadata is None:
        return {"provider": None, "served_model_error": f"no metadata at {host}/v2/models/{name}"}
    provider = metadata.get("parameters", {}).get("provider") or f"triton:{metadata.get('platform')}"
    return {"provider": provider, "served_model": metadata}


def _write_metadata() -> None:
    path = RUN.results_dir / RUN_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(RUN.metadata, indent=2, default=str) + "\n")
    temporary.replace(path)  # a reader never sees half a file


def _ship_forever(environment) -> None:
    while True:
        gevent.sleep(SHIP_EVERY_S)
        _ship(environment)


def _ship(environment) -> None:
    if RUN.outbox:
        batch, RUN.outbox = RUN.outbox, []
        environment.runner.send_message(RECORDS_MESSAGE, batch)


def _emit(record: dict) -> None:
    """Hand one finished record to the writer (local, master) or the outbox (worker)."""
    if RUN.writer is not None:
        RUN.writer.write([record])
    else:
        RUN.outbox.append(record)


def _cut_off_pending(reason: str) -> int:
    """Record every request not yet ended as cut off; returns how many."""
    cut = 0
    for key in list(RUN.pending):
        record = RUN.pending.pop(key, None)
        if record is not None:
            record.update(outcome="cut_off", reason=reason, status=0)
            _emit(record)
            cut += 1
    return cut


@events.test_stop.add_listener
def _test_stop(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        _cut_off_pending("still pending when the worker stopped")
        _ship(environment)


@events.quitting.add_listener
def _quitting(environment, **_):
    """Stop the users, cut off what is still pending, then close the writer, last. Locust fires
    this before it stops the users itself, and may fire it twice (SIGTERM's handler greenlet and
    the main greenlet): the second call waits for the first."""
    if RUN.writer is None:
        return
    if RUN.finishing:
        RUN.finished.wait(timeout=4 * GRACEFUL_STOP_S)
        return
    RUN.finishing = True
    try:
        _finish(environment)
    finally:
        RUN.finished.set()


def _finish(environment) -> None:
    runner = environment.runner
    if runner is not None and getattr(runner, "state", None) not in ("stopped", "ready"):
        runner.stop()  # users finish the request in hand (stop_timeout), then are killed
    if isinstance(runner, MasterRunner):
        gevent.sleep(2 * SHIP_EVERY_S)  # the workers' last shipment
    cut_off = _cut_off_pending("still in flight when the run ended")
    controller_state = _get_json(f"{environment.host}/v2/controller") if environment.host else None
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
    RUN.metadata.update(ended_at=datetime.now(UTC).isoformat(), finished=True, n_records=len(records),
                        cut_off_at_end=cut_off, phases=rows, controller_state_at_end=controller_state,
                        **_energy_totals(records))
    if isinstance(runner, MasterRunner):
        RUN.metadata["workers"] = worker_shares(records, RUN.workers)
    _write_metadata()
    _print_summary(rows)


def worker_shares(records: list[dict], said: list[dict]) -> list[dict]:
    """Per worker of a distributed run: its index, the schedule digest it replayed, and what it
    sent (requests, late ones), from what each worker said and the records it shipped."""
    shares = {w["source"]: {**w, "sent": 0, "late": 0} for w in said}
    for r in records:
        share = shares.setdefault(r.get("source"), {"source": r.get("source"), "sent": 0, "late": 0})
        share["sent"] += r.get("t_sent") is not None
        share["late"] += bool(r.get("late"))
    return sorted(shares.values(), key=lambda w: (w.get("worker_index", 1 << 30), str(w["source"])))


def _energy_totals(records: list[dict]) -> dict:
    """Energy per answered request over the run's windows, labelled with every source that
    contributed (a mixed run says so)."""
    path = RUN.results_dir / "windows.jsonl"
    answered = sum(r.get("outcome") == "answered" for r in records)
    if not path.exists() or answered == 0:
        return {"energy_per_request_j": None, "energy_source": "none"}
    windows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    read = [w for w in windows if w["energy_j"] is not None]  # measured or estimated, as labelled
    if not read:
        return {"energy_per_request_j": None, "energy_source": "none"}
    return {"energy_per_request_j": sum(w["energy_j"] for w in read) / answered,
            "energy_source": "+".join(sorted({w["energy_source"] for w in read}))}


def _print_summary(rows: list[dict]) -> None:
    from reports.console import wide_console
    from rich.table import Table

    def fmt(value, spec=".2f"):
        return "–" if value is None else format(value, spec)

    table = Table(title=f"green-mlops {RUN.scenario} · {RUN.metadata.get('shape')} · "
                        f"{'open loop' if RUN.metadata.get('open_loop') else 'closed loop'} · latency ms")
    for name in ("phase", "n", "req/s", "p50", "p95", "p99", "admit", "acc", "rej", "fail", "cut", "late"):
        table.add_column(name, justify="left" if name == "phase" else "right")
    for r in rows:
        table.add_row(r["phase"], str(r["n"]), fmt(r["throughput_rps"], ".1f"), fmt(r["p50_ms"]),
                      fmt(r["p95_ms"]), fmt(r["p99_ms"]), fmt(r["admission_rate"], ".1%"),
                      fmt(r["accuracy"], ".1%"), str(r["rejected"]), str(r["failed"]), str(r["cut_off"]),
                      str(r["late"]))
    console = wide_console(stderr=True, markup=False, highlight=False)
    console.print(table)
    console.print(f"records: {RUN.writer.path}", soft_wrap=True)


# --- users ------------------------------------------------------------------------------------------
def _served_name(options) -> str:
    """The model's name on the server: the gateway serves it as is; Triton as ``<name>_full``
    (standard) or ``<name>_bio`` (bio)."""
    name = _resolve(options.model).name
    if options.backend == "triton":
        return f"{name}_bio" if RUN.scenario == "bio" else f"{name}_full"
    return name


def _load_data(options):
    """JSON bodies for every evaluation row (encoded once) and their labels."""
    if RUN.data is None:
        from targets.backends.kserve import datatype_of

        spec = _resolve(options.model)
        x, y = _load_eval(spec)
        datatype = datatype_of(spec.input_dtype)
        bodies = [json.dumps({"inputs": [{"name": spec.input_name, "shape": [1, *x.shape[1:]],
                                          "datatype": datatype, "data": row.ravel().tolist()}]}).encode()
                  for row in x]
        drifted = None
        if options.drift_at_s >= 0:  # the same rows, shifted: what the audit must notice
            rng = np.random.default_rng(options.seed)
            scale = options.drift_noise * (x.std(axis=0, keepdims=True) + 1e-6)
            noisy = (x + rng.standard_normal(x.shape) * scale).astype(x.dtype)
            drifted = [json.dumps({"inputs": [{"name": spec.input_name, "shape": [1, *x.shape[1:]],
                                               "datatype": datatype, "data": row.ravel().tolist()}]}).encode()
                       for row in noisy]
        RUN.data = (spec.name, bodies, [int(v) for v in y])
        RUN.drifted_bodies = drifted
    return RUN.data


class _InferUser(FastHttpUser):
    abstract = True
    concurrency = 64  # connections per user: open-loop sends overlap
    network_timeout = connection_timeout = 10.0  # --request-timeout-s

    def on_start(self):
        options = _options(self.environment)
        _, self.bodies, self.labels = _load_data(options)
        self.path = f"/v2/models/{_served_name(options)}/infer"
        self.shape = _shape_of(options)
        self.late_ms = options.late_ms
        self.drift_at_s = options.drift_at_s if RUN.drifted_bodies is not None else None
        self.source = getattr(self.environment.runner, "client_id", "local")

    def send(self, row: int, intended_s: float | None, seq: int | None = None, zero_s: float | None = None) -> None:
        """Send evaluation row ``row``; record it whatever happens. ``intended_s``: the open-loop
        schedule time (``seq`` its index, ``zero_s`` the schedule's start)."""
        started_s = time.time()
        t_ref = intended_s if intended_s is not None else started_s
        zero = zero_s if zero_s is not None else (RUN.started_s or t_ref)
        record = {"seq": seq, "row": row, "label": self.labels[row], "t_intended": t_ref, "t_sent": None,
                  "offset_s": t_ref - zero, "phase": self.shape.phase_at(t_ref - zero), "source": self.source,
                  "status": 0, "outcome": "cut_off", "reason": "not yet on the wire when the run ended",
                  "admitted": False, "action": None, "correct": False, "predicted": None, "tau": None, "u": None, "threshold": None,
                  "path_index": None, "stage": None, "exit": None, **dict.fromkeys(SLO_FIELDS),
                  "certificate": None, "audited": None, "drifted": False,
                  "latency_ms": None, "service_ms": None, "late": False}
        body = self.bodies[row]
        if self.drift_at_s is not None and record["offset_s"] >= self.drift_at_s:
            body, record["drifted"] = RUN.drifted_bodies[row], True
        key = id(record)
        RUN.pending[key] = record
        me = id(gevent.getcurrent())
        try:
            with self.client.post(self.path, data=body, name="infer", catch_response=True,
                                  headers={"Content-Type": "application/json",
                                            LABEL_HEADER: str(self.labels[row])}) as response:
                done_s = time.time()
                status = response.status_code or 0
                answer = _parse(response.content) if status else {}
                outcome, reason = outcome_of(status, answer, getattr(response, "error", None))
                if outcome == "failed":
                    response.failure(reason)
                else:
                    response.success()  # a rejection is the controller's answer, not a failure
            sent_s = _WIRE_S.pop(me, None) or started_s
            parameters = answer.get("parameters", {})
            predicted = answer.get("predicted")
            record.update(
                t_sent=sent_s, status=status, outcome=outcome, reason=reason,
                latency_ms=(done_s - t_ref) * 1e3, service_ms=(done_s - sent_s) * 1e3,
                late=intended_s is not None and (sent_s - intended_s) * 1e3 > self.late_ms,
                admitted=bool(parameters.get("admitted", True)) if outcome == "answered" else False,
                action=parameters.get("action", "full") if outcome == "answered" else
                parameters.get("action", "reject") if outcome == "rejected" else None,
                correct=outcome == "answered" and predicted == record["label"], predicted=predicted,
                tau=parameters.get("tau"), u=parameters.get("u"), threshold=parameters.get("threshold"),
                path_index=parameters.get("path_index"), stage=parameters.get("stage"), exit=parameters.get("exit"),
                certificate=parameters.get("certificate"), audited=parameters.get("audited"),
                **{name: parameters.get(name) for name in SLO_FIELDS})
        except BaseException as exc:  # killed at the end of the run (GreenletExit), or interrupted
            sent_s = _WIRE_S.pop(me, None)
            if sent_s is not None:
                record.update(t_sent=sent_s, reason=f"still in flight when the run ended ({type(exc).__name__})")
            raise
        finally:
            _WIRE_S.pop(me, None)
            if RUN.pending.pop(key, None) is not None:  # not already recorded as cut off
                _emit(record)


# The budget policy's SLO loop state as the gateway answered (absent without an SLO).
SLO_FIELDS = ("slo_p95_ms", "slo_seen_p95_ms", "slo_service_p95_ms", "slo_threshold", "shed_probability")


_users_started = [0]  # closed-loop users started in this process


class ClosedLoopUser(_InferUser):
    """Sends the next request as soon as the previous one is answered, rows at random."""

    wait_time = constant(0)

    def on_start(self):
        super().on_start()
        import random

        _users_started[0] += 1  # seeded per user: a closed-loop run's rows are reproducible too
        self.rng = random.Random(f"{_options(self.environment).seed}-{self.source}-{_users_started[0]}")

    @task
    def infer(self):
        self.send(self.rng.randrange(len(self.bodies)), None)


_generators_started = [0]  # open-loop generators started in this process
WORKER_MESSAGE = "green_mlops_worker"  # a worker's share of the schedule, sent to the master once
SCHEDULE_MESSAGE = "green_mlops_schedule"  # the master's schedule, sent to every worker at test start
SCHEDULE_WAIT_S = 30.0


def worker_count(options) -> int:
    """Workers of a distributed run as the master knows them (``--processes`` or
    ``--expect-workers``; Locust forwards ``expect_workers`` to its workers), 1 otherwise."""
    return max(getattr(options, "processes", 0) or 0, getattr(options, "expect_workers", 1) or 1, 1)


def open_loop_generators(options, workers: int) -> int:
    """Arrival generators over the whole run: ``--open-loop-users`` rounded up to a multiple of the
    workers, so that Locust's dispatcher gives every worker the same number and generator
    ``g = worker + workers × local`` takes arrivals ``g, g + G, g + 2G, …``: together they send
    every arrival of the schedule exactly once."""
    users = max(options.open_loop_users, 1)
    return -(-users // workers) * workers


class OpenLoopUser(_InferUser):
    """Replays its share of the schedule: arrival i goes to generator ``i % open_loop_users``.
    Each arrival is sent in its own greenlet, at most ``concurrency`` at once (one per pooled
    connection): when all are busy the generator waits, and what it sends then is late."""

    wait_time = constant(0)

    def on_start(self):
        super().on_start()
        options = _options(self.environment)
        runner = self.environment.runner
        distributed = isinstance(runner, WorkerRunner)
        workers = worker_count(options) if distributed else 1
        worker = getattr(runner, "worker_index", 0) if distributed else 0
        local = _generators_started[0]
        _generators_started[0] += 1
        self.stride = open_loop_generators(options, workers)
        self.next_index = worker + workers * local
        if distributed and not RUN.schedule_ready.wait(timeout=SCHEDULE_WAIT_S):
            print(f"green-mlops: worker {worker}: no schedule from the master within {SCHEDULE_WAIT_S:g} s; "
                  "this generator sends nothing (the master's report counts the arrivals not sent)",
                  file=sys.stderr, flush=True)
            raise StopUser()
        self.schedule = RUN.schedule or _schedule(options, self.shape, len(self.bodies))
        if distributed and not RUN.share_said:  # once per worker: its share, for the master to check
            RUN.share_said = True
            runner.send_message(WORKER_MESSAGE, {"source": self.source, "worker_index": worker, "workers": workers,
                                                 "generators": self.stride,
                                                 "schedule_digest": self.schedule.describe()["digest"]})
        RUN.schedule = self.schedule
        self.inflight = Pool(self.concurrency)
        self.zero_s = time.time()

    def on_stop(self):
        self.inflight.join(timeout=GRACEFUL_STOP_S)
        self.inflight.kill(block=True, timeout=2)

    @task
    def arrivals(self):
        """Issue the arrivals of the next slice of time, each in its own greenlet."""
        offsets, rows = self.schedule.offsets_s, self.schedule.rows
        slice_end = time.time() + ARRIVAL_SLICE_S
        while self.next_index < len(offsets) and self.zero_s + offsets[self.next_index] < slice_end:
            i = self.next_index
            intended = self.zero_s + offsets[i]
            delay = intended - time.time()
            if delay > 0:
                gevent.sleep(delay)
            self.inflight.spawn(self.send, rows[i], intended, i, self.zero_s)  # waits while all are busy
            self.next_index += self.stride
        if self.next_index >= len(offsets):
            gevent.sleep(ARRIVAL_SLICE_S)  # the schedule is done: idle until the shape ends the run


class CongestionShape(LoadTestShape):
    """The ``--shape`` pattern; closed-loop users, or open-loop generators with ``--arrival-rate``.
    Reads ``-u``, ``-r`` and ``-t`` (a pattern ends at ``-t``, else at its natural length).
    Users are spawned at ``-r`` per second when given, else all at once (users × 10 per second)."""

    use_common_options = True

    def tick(self):
        options = self.runner.environment.parsed_options
        shape = _shape_of(options)
        t = self.get_run_time()
        if t >= shape.end_s:
            return None
        if options.arrival_rate > 0:
            workers = worker_count(options) if isinstance(self.runner, MasterRunner) else 1
            users = open_loop_generators(options, workers)
            return users, spawn_rate(users, RUN.spawn_rate), [OpenLoopUser]
        users = shape.users_at(t)
        return users, spawn_rate(users, RUN.spawn_rate), [ClosedLoopUser]
