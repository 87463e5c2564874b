"""Issue 27's pieces that need no server: CPU sets, the gathering transport, the py-spy breakdown,
wrk's and Locust's figures."""
from __future__ import annotations

import json
import os

import pytest

from loadtests.crosscheck import locust_figures
from loadtests.overhead import WAITING, categorise, parse_raw
from loadtests.wrk import _lua, parse_output
from targets.cpus import PIN_ENV, cpu_list, serving_threads, split_for_load_test
from targets.serving.gateway import BoundedExecutor, QueueFull
from targets.serving.http_protocol import _GatheringTransport


def test_cpu_list_reads_like_taskset():
    assert cpu_list([0]) == "0"
    assert cpu_list([3, 0, 1, 2, 5, 7, 8]) == "0-3,5,7-8"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_split_gives_disjoint_halves_and_the_server_the_larger(monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    assert split_for_load_test([0]) is None
    assert split_for_load_test([0, 1]) == ([0], [1])
    generator, server = split_for_load_test([0, 1, 2, 3, 4])
    assert generator == [0, 1] and server == [2, 3, 4]
    monkeypatch.setenv(PIN_ENV, "0")
    assert split_for_load_test([0, 1]) is None


def test_serving_threads_follow_the_cpu_share():
    assert serving_threads([1]) == 1
    assert serving_threads([0, 1]) == 2
    assert serving_threads(list(range(16))) == 16


class _Transport:
    def __init__(self):
        self.writes, self.closed, self.aborted = [], False, False

    def write(self, data):
        self.writes.append(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    def get_write_buffer_size(self):
        return 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


class _Loop:
    def __init__(self):
        self.soon = []

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))


def test_gathering_transport_writes_once_per_answer():
    raw, loop = _Transport(), _Loop()
    transport = _GatheringTransport(raw, loop)
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(memoryview(b"body"))
    assert raw.writes == [] and len(loop.soon) == 1  # one flush scheduled for the loop step
    assert transport.get_write_buffer_size() == 23
    transport.flush()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    transport.flush()  # the scheduled flush finds nothing left
    assert len(raw.writes) == 1
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else passes through


def test_gathering_transport_sends_before_close_and_drops_on_abort():
    raw, loop = _Transport(), _Loop()
    transport = _GatheringTransport(raw, loop)
    transport.write(b"answer")
    transport.close()
    assert raw.writes == [b"answer"] and raw.closed
    raw2 = _Transport()
    transport = _GatheringTransport(raw2, loop)
    transport.write(b"lost")
    transport.abort()
    transport.flush()
    assert raw2.writes == [] and raw2.aborted


def test_reserved_jobs_count_against_the_queue_bound():
    executor = BoundedExecutor(1, 2)
    try:
        executor.reserve()
        executor.reserve()
        with pytest.raises(QueueFull):
            executor.reserve()
        with pytest.raises(QueueFull):
            executor.submit(lambda: None)
        executor.release()
        assert executor.pending == 1
        executor.submit(lambda: None).result(timeout=5)
    finally:
        executor.shutdown()


def test_samples_are_sorted_by_the_innermost_known_frame():
    ort = "run (onnxruntime/capi/session.py:1)"
    worker = "_worker (concurrent/futures/thread.py:83);answer (targets/serving/gateway.py:5)"
    assert categorise(f"{worker};predict (targets/control/controlled.py:79);{ort}") == "inference (ONNX Runtime)"
    assert categorise(f"{worker};decode_infer_request (targets/backends/kserve.py:1);loads (json/__init__.py:2)") == \
        "parse + validate (request)"
    assert categorise(f"{worker};encode_infer_response (targets/backends/kserve.py:220);dumps (json/__init__.py:1)") == \
        "encode (answer JSON)"
    assert categorise("_worker (concurrent/futures/thread.py:81)") == WAITING
    assert categorise("main (cli.py:1);Runner.run (asyncio/runners.py:118)") == WAITING
    assert categorise(f"{worker};set_result (concurrent/futures/_base.py:550);_call_set_state (asyncio/futures.py:403)"
                      ) == "queue hop (thread pool)"
    assert categorise("main (x.py:1);something (elsewhere.py:2)") == "other"
    counts = parse_raw(f"{worker};{ort} 7\n_worker (concurrent/futures/thread.py:81) 3\nnot a sample\n")
    assert counts == {"inference (ONNX Runtime)": 7, WAITING: 3}


WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:8000
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.10ms    1.20ms  20.00ms   90.00%
  Latency Distribution
     50%    6.95ms
     75%    7.50ms
     90%    8.10ms
     99%   12.00ms
  6750 requests in 3.00s, 4.10MB read
  Non-2xx or 3xx responses: 2
Requests/sec:   2250.00
Transfer/sec:      1.37MB
"""


def test_wrk_figures_are_read_from_its_report():
    figures = parse_output(WRK_OUTPUT)
    assert figures == {"requests_per_s": 2250.0, "p50_ms": 6.95, "requests": 6750, "non_2xx": 2, "socket_errors": 0}
    assert parse_output(WRK_OUTPUT.replace("6.95ms", "950.00us"))["p50_ms"] == pytest.approx(0.95)
    with pytest.raises(RuntimeError):
        parse_output("wrk: connection refused")


def test_wrk_script_quotes_paths():
    script = _lua('/tmp/a "b"/bodies.jsonl', "/v2/models/digits/infer")
    assert 'io.lines("/tmp/a \\"b\\"/bodies.jsonl")' in script
    assert '"/v2/models/digits/infer"' in script and "(counter % #bodies)" in script


def test_locust_figures_skip_the_warm_up(tmp_path):
    records = [{"t_sent": float(t), "status": 200, "latency_ms": 5.0 if t < 20 else 10.0} for t in range(100)]
    records.append({"t_sent": 99.5, "status": 503, "latency_ms": 1.0})
    records.append({"t_sent": None, "status": 0, "latency_ms": None})
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = locust_figures(path)
    assert figures["requests"] == 80 and figures["failed"] == 1
    assert figures["p50_ms"] == 10.0
    assert figures["requests_per_s"] == pytest.approx(80 / 79.6, rel=1e-6)


def test_the_report_says_where_locust_and_the_gateway_ran():
    from reports.render import _cpu_sets

    assert _cpu_sets({"cpu_sets": {"load_generator": "0", "gateway": "1"}}) == "; Locust on CPU 0, gateway on CPU 1"
    assert _cpu_sets({"cpu_sets": "shared: Locust and the gateway not pinned"}) == \
        "; shared: Locust and the gateway not pinned"
    assert _cpu_sets({}) == ""  # runs recorded before CPU sets were
