"""Sizing the offered load to the machine (``validate --load-arrival-rate auto``): the arithmetic,
the shapes' peak factors, and the probe against servers whose service time is planted."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loadtests.capacity import (CEILING_RPS, MAX_STRETCH, ProbeError, RoundTrips, Sizing, duration_stretch,
                                infer_bodies, probe_round_trips, size_arrival_rate)
from loadtests.shapes import Shape, ShapeParams


def test_the_rate_asks_for_half_the_capacity_at_the_peak_and_never_passes_the_ceiling():
    # The figures of the 2-core machine the fixed default was set on (about 3 ms a round trip): 40.
    assert size_arrival_rate(1000 / 3.1, 4.0) == (CEILING_RPS, True)
    # A machine three times slower (11.5 ms): 0.5 x 86.96 / 4 = 10.87, rounded down to 10.8.
    assert size_arrival_rate(1000 / 11.5, 4.0) == (10.8, False)
    assert size_arrival_rate(100.0, 1.0, utilisation=0.25) == (25.0, False)
    assert size_arrival_rate(0.01, 4.0) == (0.1, False)  # never zero: zero would be closed loop
    for bad in ((0.0, 4.0), (100.0, 0.0), (100.0, 4.0, 0.0), (100.0, 4.0, 1.5), (100.0, 4.0, 0.5, 0.0)):
        with pytest.raises(ValueError):
            size_arrival_rate(*bad)


def test_slower_runs_are_stretched_to_keep_their_requests_up_to_a_limit():
    assert duration_stretch(CEILING_RPS) == 1.0 and duration_stretch(80.0) == 1.0
    assert duration_stretch(20.0) == 2.0
    assert duration_stretch(10.8) == pytest.approx(40 / 10.8)
    assert duration_stretch(1.0) == MAX_STRETCH


@pytest.mark.parametrize("name, factor", [("steady", 1.0), ("spike", 4.0), ("ramp", 2.0), ("wave", 2.0),
                                          ("step", 2.0)])
def test_peak_factor_is_the_largest_load_over_the_base(name, factor):
    assert Shape(name, ShapeParams(base_users=4, peak_users=8, phase_s=5.0)).peak_factor == pytest.approx(factor)


def test_sizing_says_what_it_measured_and_what_it_chose():
    probe = RoundTrips(requests=200, mean_ms=11.5, p50_ms=10.7)
    rate, capped = size_arrival_rate(probe.capacity_rps, 4.0)
    sizing = Sizing(rate, probe, "gateway --controller off on CPUs 1", 4.0, 0.5, CEILING_RPS, capped,
                    duration_stretch(rate))
    record = sizing.as_dict()
    assert record["source"] == "auto" and record["arrival_rate_rps"] == 10.8
    assert record["probe"]["capacity_rps"] == pytest.approx(86.96, abs=0.01)
    assert record["peak_utilisation"] == pytest.approx(10.8 * 4 / 86.96, abs=1e-3)
    assert record["duration_stretch"] == pytest.approx(3.704, abs=1e-3)
    line = sizing.line()
    assert "10.8 req/s base" in line and "11.50 ms" in line and "about 87 req/s" in line
    assert "3.70x longer" in line and "--load-arrival-rate N" in line


class _Planted(BaseHTTPRequestHandler):
    """Answers every POST after ``delay_s`` (HTTP/1.1 keep-alive), or with ``status``."""

    protocol_version = "HTTP/1.1"
    delay_s = 0.0
    status = 200

    def do_POST(self):  # noqa: N802 (the standard library's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(self.delay_s)
        body = b'{"outputs": []}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def planted_server():
    servers = []

    def start(delay_s: float, status: int = 200) -> str:
        handler = type("Handler", (_Planted,), {"delay_s": delay_s, "status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_probe_recovers_a_planted_service_time(planted_server):
    bodies = infer_bodies(np.zeros((3, 4), dtype=np.float32), "x")
    fast = probe_round_trips(planted_server(0.002), "/v2/models/m/infer", bodies, requests=30, warmup=2)
    slow = probe_round_trips(planted_server(0.060), "/v2/models/m/infer", bodies, requests=30, warmup=2)
    assert fast.requests == slow.requests == 30
    assert slow.mean_ms >= 60.0 and slow.p50_ms >= 60.0  # a round trip cannot be shorter than its sleep
    assert fast.mean_ms < slow.mean_ms - 30.0  # 58 ms apart by construction
    # What validate would then offer: the slow server gets a rate its peak can take.
    rate, capped = size_arrival_rate(slow.capacity_rps, 4.0)
    assert not capped and rate * 4.0 <= 0.5 * 1000 / 60.0


def test_the_probe_fails_with_a_message_on_an_error_or_a_closed_port(planted_server):
    bodies = infer_bodies(np.zeros((2, 4), dtype=np.int64), "input_ids")
    assert json.loads(bodies[0])["inputs"][0]["datatype"] == "INT64"
    with pytest.raises(ProbeError, match="HTTP 503"):
        probe_round_trips(planted_server(0.0, status=503), "/v2/models/m/infer", bodies, requests=3, warmup=0)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(ProbeError, match="could not reach"):
        probe_round_trips(f"127.0.0.1:{port}", "/v2/models/m/infer", bodies, requests=3, warmup=0)
    with pytest.raises(ValueError):
        probe_round_trips(f"127.0.0.1:{port}", "/x", [], requests=3)


def test_the_report_reads_the_sizing_back_and_says_it_in_one_sentence(tmp_path):
    from reports.render import offered_load_line
    from reports.runs import OFFERED_LOAD_FILE, load_offered_load
    from targets.errors import GreenMLOpsError

    assert load_offered_load(tmp_path) is None  # a results directory without a sizing: nothing to say
    probe = RoundTrips(requests=200, mean_ms=8.26, p50_ms=7.9)
    rate, capped = size_arrival_rate(probe.capacity_rps, 4.0)
    record = Sizing(rate, probe, "gateway --controller off on CPUs 1", 4.0, 0.5, CEILING_RPS, capped,
                    duration_stretch(rate)).as_dict()
    (tmp_path / OFFERED_LOAD_FILE).write_text(json.dumps(record))
    assert load_offered_load(tmp_path) == record
    line = offered_load_line(record)
    assert line.startswith("Offered load sized to this machine: 15.1 req/s base (gateway --controller off on CPUs 1")
    assert "8.26 ms over 200 requests" in line and "50 % of that at the shape's 4x peak" in line
    assert "2.65x longer" in line
    assert offered_load_line({"source": "given", "arrival_rate_rps": 40.0}) is None and offered_load_line(None) is None
    (tmp_path / OFFERED_LOAD_FILE).write_text("{not json")
    with pytest.raises(GreenMLOpsError, match="not valid JSON"):
        load_offered_load(tmp_path)
