"""Request records on disk: one JSON line per request that was sent, flushed as written.

Every request ends as exactly one record, with ``outcome``:

* ``answered``: HTTP 200 (``correct`` compares ``predicted`` with ``label``);
* ``rejected``: the controller's 503 (no answer: scored as wrong by the reports);
* ``failed``: anything else (a backend 503, any 5xx or 4xx, a timeout, a refused or reset
  connection), with its ``reason``;
* ``cut_off``: still in flight, or not yet on the wire, when the run ended (``reason`` says which).

A record also holds ``seq`` (open loop: the arrival's index in the schedule), ``row`` (the
evaluation row sent), ``t_intended`` (Unix seconds: the schedule's time in open loop, the send
otherwise), ``offset_s`` (``t_intended`` after the schedule's start), ``t_sent`` (when the
request got its connection, i.e. went on the wire; None if it never did), ``latency_ms`` (from
``t_intended`` to the answer), ``service_ms`` (from ``t_sent``), ``late`` (on the wire more than
``late_ms`` after ``t_intended``), ``status`` (0: no HTTP status), ``admitted``, ``action``,
``tau``, ``u``, ``threshold`` (budget policy: the exit threshold u was compared with),
``path_index`` (budget policy: the point of the certified path the request ran), ``stage``
(where the row left the ladder: 1 … N, N being the full model; 0 when shed), ``exit`` (the exit of the
last decision), ``phase`` and ``source`` (which Locust process sent it). With the budget policy's
SLO loop on, every record also holds the loop's state when the gateway answered: ``slo_p95_ms``
(the target), ``slo_seen_p95_ms`` (the recent p95 it acted on), ``slo_threshold`` (its level on the
certified path, 0 … 1) and
``shed_probability``; these are None otherwise.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path


REQUESTS_FILE = "requests.jsonl"
RUN_FILE = "run.json"


class RecordWriter:
    """Appends records to ``requests.jsonl``, one flushed line each: a crash or Ctrl-C loses
    nothing already written. Thread- and greenlet-safe. Writing after ``close()`` is a bug of the
    caller and raises (the scenario closes the writer only once every request has ended)."""

    def __init__(self, results_dir: Path):
        results_dir.mkdir(parents=True, exist_ok=True)
        self.path = results_dir / REQUESTS_FILE
        self._out = self.path.open("a", buffering=1)
        self._lock = threading.Lock()
        self.count = 0

    def write(self, records: list[dict]) -> None:
        with self._lock:
            for record in records:
                self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._out.flush()
            self.count += len(records)

    def close(self) -> None:
        with self._lock:
            self._out.close()
