"""Request records on disk: one JSON line per answered (or failed) request, flushed as written.

A record holds: ``t_intended`` and ``t_sent`` (Unix seconds), ``latency_ms`` (from the intended
send time in open-loop mode, from the actual send otherwise), ``service_ms`` (actual send to
answer), ``late`` (open loop: left more than ``late_ms`` after its intended time), ``status``,
``admitted``, ``action``, ``correct``, ``label``, ``predicted``, ``tau``, ``u``, ``phase``,
``source`` (which Locust process sent it).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path


REQUESTS_FILE = "requests.jsonl"
RUN_FILE = "run.json"


class RecordWriter:
    """Appends records to ``requests.jsonl``, one flushed line each: a crash or Ctrl-C loses
    nothing already written. Thread- and greenlet-safe."""

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
