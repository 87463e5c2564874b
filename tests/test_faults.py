"""Fault injection with real processes: the gateway (a uvicorn subprocess) under a backend that
dies, hangs or answers garbage, under slow-loris uploads, and after a thousand server-side
failures. What must hold throughout: every request is answered (a 2xx, or a 4xx/503 with a JSON
message, a 503 with Retry-After), none hangs, no 500 and no traceback in the gateway's log, and no
process is left behind. (Locust-driven faults, the gateway or the load generator killed mid-run,
are in test_faults_load.py.)"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_gateway import infer_body, read_status


def live_children() -> set[int]:
    """This process's children that still run (a reaped or zombie child is gone)."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.fixture(autouse=True)
def no_orphans():
    """Set up before the gateways, torn down after them: no process this test started survives."""
    before = live_children()
    yield
    deadline = time.monotonic() + 30
    while (live_children() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live_children() - before, "processes left behind"


def assert_clean_log(gateway) -> None:
    log = gateway.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def assert_no_server_errors(gateway) -> None:
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'outcome="server_error"' not in metrics


class Call:
    """One request's fate: status, Retry-After, error message, seconds, or the exception."""

    def __init__(self, client: httpx.Client, url: str, body: dict):
        started = time.monotonic()
        self.status, self.retry_after, self.error, self.exception = 0, None, None, None
        try:
            response = client.post(url, json=body)
            self.status = response.status_code
            self.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                self.error = response.json()["error"]
        except Exception as exc:  # a reset, a refused connection, a client timeout: the fault we test for
            self.exception = exc
        self.seconds = time.monotonic() - started


def hammer(url: str, bodies: list[dict], threads: int, stop_after_s: float | None = None) -> list[Call]:
    """Send ``bodies`` from ``threads`` keep-alive clients (each its share, in order); every
    request's fate."""
    calls: list[Call] = []
    lock = threading.Lock()
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s

    def work(share):
        with httpx.Client(timeout=60) as client:
            for body in share:
                if deadline is not None and time.monotonic() > deadline:
                    return
                call = Call(client, url, body)
                with lock:
                    calls.append(call)

    workers = [threading.Thread(target=work, args=(bodies[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return calls


def assert_answered_cleanly(calls: list[Call], allowed: set[int]) -> None:
    failures = [c.exception for c in calls if c.exception is not None]
    assert not failures, f"{len(failures)} requests got no answer: {failures[:3]}"
    assert {c.status for c in calls} <= allowed, sorted({c.status for c in calls})
    for call in calls:
        if call.status == 503:
            assert call.retry_after and call.error


def test_triton_killed_mid_run(local_triton, triton_repo, start_gateway, digits_eval):
    """SIGKILL Triton under load: the plain gateway answers 503 + Retry-After within its timeout,
    the one with --triton-fallback keeps answering 200; nothing is lost, nothing hangs."""
    from targets.backends.triton_server import TritonServer

    server = TritonServer(triton_repo)
    try:
        common = ("--backend", "triton", "--triton-url", server.url, "--triton-timeout-s", "1",
                  "--controller", "off")
        plain = start_gateway(*common)
        fallback = start_gateway(*common, "--triton-fallback")
        x = digits_eval[0]
        bodies = [infer_body(x[i % len(x) : i % len(x) + 1]) for i in range(4000)]
        results: dict[str, list[Call]] = {}

        def load(name, gateway):
            results[name] = hammer(f"{gateway.url}/v2/models/digits/infer", bodies, threads=3, stop_after_s=5)

        loads = [threading.Thread(target=load, args=(n, g)) for n, g in (("plain", plain), ("fallback", fallback))]
        for t in loads:
            t.start()
        time.sleep(2)
        group = server.process.pid  # the server leads its process group (its backend stubs are in it)
        server.process.kill()  # mid-run, no warning
        killed_at = time.monotonic()
        for t in loads:
            t.join()
    finally:
        server.stop()
    deadline = time.monotonic() + 10  # SIGKILLed stubs take a moment to be reaped
    while (stubs := subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stubs == [], f"Triton's backend stubs outlived the killed server: {stubs}"  # no orphans
    assert time.monotonic() - killed_at > 1  # the load did go on after the kill
    plain_calls, fallback_calls = results["plain"], results["fallback"]
    assert_answered_cleanly(plain_calls, {200, 503})
    statuses = [c.status for c in plain_calls]
    assert statuses.count(200) > 0 and statuses.count(503) > 0  # before and after the kill
    assert all("inference backend unavailable" in c.error for c in plain_calls if c.status == 503)
    assert max(c.seconds for c in plain_calls) < 10  # bounded by the 1 s timeout, plus queueing
    assert_answered_cleanly(fallback_calls, {200})
    for gateway in (plain, fallback):
        assert_no_server_errors(gateway)
        assert gateway.stop() == 0
        assert_clean_log(gateway)


def test_triton_that_hangs_is_a_503_within_the_timeout(fake_triton, start_gateway, digits_eval):
    triton = fake_triton(mode="hang", hang_s=30)
    gateway = start_gateway("--backend", "triton", "--triton-url", triton.url, "--triton-timeout-s", "1",
                            "--controller", "off")
    calls = hammer(f"{gateway.url}/v2/models/digits/infer", [infer_body(digits_eval[0][:1])] * 8, threads=4)
    assert_answered_cleanly(calls, {503})
    assert max(c.seconds for c in calls) < 10
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_a_thousand_server_side_failures_leave_the_gateway_answering(fake_triton, start_gateway, digits_eval):
    """Triton errors, garbage, answers without outputs and dropped connections, 250 of each: each
    is a 503 with Retry-After (or, with the fallback, a 200); the gateway answers afterwards."""
    triton = fake_triton(mode="cycle")
    plain = start_gateway("--backend", "triton", "--triton-url", triton.url, "--triton-timeout-s", "2")
    fallback = start_gateway("--backend", "triton", "--triton-url", triton.url, "--triton-timeout-s", "2",
                             "--triton-fallback")
    x = digits_eval[0]
    bodies = [infer_body(x[i % len(x) : i % len(x) + 1]) for i in range(1000)]
    calls = hammer(f"{plain.url}/v2/models/digits/infer", bodies, threads=4)
    assert len(calls) == 1000
    assert_answered_cleanly(calls, {503})
    assert all("inference backend unavailable" in c.error for c in calls)
    # Afterwards: alive, ready, and still answering cleanly.
    assert httpx.get(f"{plain.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{plain.url}/v2/models/digits").status_code == 200
    assert Call(httpx.Client(timeout=30), f"{plain.url}/v2/models/digits/infer", bodies[0]).status == 503
    metrics = httpx.get(f"{plain.url}/metrics").text
    assert 'outcome="backend_error"' in metrics
    assert_no_server_errors(plain)
    assert_clean_log(plain)

    fallback_calls = hammer(f"{fallback.url}/v2/models/digits/infer", bodies[:200], threads=4)
    assert_answered_cleanly(fallback_calls, {200})
    assert plain.stop() == 0 and fallback.stop() == 0
    assert_clean_log(plain)
    assert_clean_log(fallback)


def stalled_upload(host_port: str) -> socket.socket:
    """A slow-loris: headers promising 8 kB, then 20 bytes, then silence."""
    host, port = host_port.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 8000\r\n\r\n" + b'{"inputs": [{"name": ')
    return sock


def sequential(client: httpx.Client, url: str, bodies: list[dict]) -> tuple[list[bool], np.ndarray]:
    """Admission of each request and the latencies (ms), one request at a time."""
    admitted, latency_ms = [], []
    for body in bodies:
        started = time.perf_counter()
        response = client.post(url, json=body)
        latency_ms.append((time.perf_counter() - started) * 1e3)
        assert response.status_code == 200
        admitted.append(response.json()["parameters"]["admitted"])
    return admitted, np.array(latency_ms)


def test_fifty_slow_loris_uploads_change_nothing_for_other_clients(start_gateway, digits_eval):
    # τ constant and the latency term off: a decision depends only on u(x) and the in-flight count,
    # so the same rows must get the same decisions with and without the stalled uploads.
    gateway = start_gateway("--controller", "bio", "--tau0", "0.9", "--tau-inf", "0.9", "--slo-ms", "1e9",
                            "--capacity", "8", "--body-timeout-s", "8")
    x = digits_eval[0]
    bodies = [infer_body(x[i : i + 1]) for i in range(120)]
    url = f"{gateway.url}/v2/models/digits/infer"
    with httpx.Client(timeout=30) as client:
        sequential(client, url, bodies[:20])  # warm-up
        baseline_admitted, baseline_ms = sequential(client, url, bodies)
        stalled = [stalled_upload(gateway.host_port) for _ in range(50)]
        try:
            opened = time.monotonic()
            time.sleep(0.2)
            state = client.get(f"{gateway.url}/v2/controller").json()
            loris_admitted, loris_ms = sequential(client, url, bodies)
            measured_within_s = time.monotonic() - opened
            statuses = [read_status(sock) for sock in stalled]
            timed_out_after_s = time.monotonic() - opened
        finally:
            for sock in stalled:
                sock.close()
    assert state["in_flight"] == 0 and state["congestion"] < 1e-6  # the latency term is ~0, not the queue
    assert measured_within_s < 8, "the machine was too slow to measure while the uploads stalled"
    assert loris_admitted == baseline_admitted
    assert 0 < sum(baseline_admitted) < len(bodies)  # the controller did decide both ways
    p95_base, p95_loris = np.percentile(baseline_ms, 95), np.percentile(loris_ms, 95)
    assert p95_loris <= 3 * p95_base + 25, (p95_base, p95_loris)
    assert statuses == [408] * 50
    assert timed_out_after_s < 8 + 15
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'outcome="body_timeout"} 50.0' in metrics
    assert_no_server_errors(gateway)
    assert gateway.stop() == 0
    assert_clean_log(gateway)
