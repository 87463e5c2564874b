"""Where a gateway request's time goes: py-spy samples of a gateway under load, by category.

    python -m loadtests.overhead --model digits --seconds 20 [--concurrency 1] [-- SERVE ARGS]

Starts ``green-mlops serve`` (``--controller off`` unless other serve arguments are given after
``--``), sends held-out rows over keep-alive connections (``--concurrency`` clients, each one
request at a time), records the gateway with ``py-spy record --format raw`` (every thread, idle
threads left out, ``--nonblocking`` so the sampler never pauses the server) and sorts each sample
by the innermost frame that names a part of the path (rules in ``CATEGORIES``). Prints the CPU
time per request of each part, the client's p50 and the requests per second; ``--raw FILE`` keeps
the collapsed stacks. Needs ``py-spy`` (``pip install py-spy``) and the right to trace the gateway
(root, or ``kernel.yama.ptrace_scope`` 0).

What a sample shows is a thread that is running *or waiting for a CPU* (runnable): on a busy
machine the time a thread waits to be scheduled again after it wrote an answer (which woke the
client) lands on that write. Stacks that end where a thread sleeps (the loop in its poll, an idle
worker) are counted apart. The hand-off between the event loop and a worker thread costs mostly
wake-ups and the GIL, which show under ``concurrent/futures`` and asyncio's future callbacks.
"""
from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from loadtests.capacity import infer_bodies
from loadtests.gateway_process import GatewayProcess

# (category, substring of a frame "function (file:line)"), tried from the innermost frame out;
# the first frame that matches any rule names the sample's category.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("inference (ONNX Runtime)", "onnxruntime"),
    ("metrics (Prometheus)", "prometheus_client"),
    ("records (live dashboard)", "targets/serving/live.py"),
    ("records (live dashboard)", "targets/serving/dashboard.py"),
    ("controller", "targets/control/controller.py"),
    ("encode (answer JSON)", "encode_infer_response"),
    ("encode (answer JSON)", "_decision_parameters"),
    ("encode (answer JSON)", "_row_parameters"),
    ("parse + validate (request)", "targets/backends/kserve.py"),
    ("parse + validate (request)", "check_batch"),
    ("parse + validate (request)", "targets/model/tokenizer.py"),
    ("model path (other)", "targets/control/controlled.py"),
    ("model path (other)", "targets/backends/ort_target.py"),
    ("queue hop (thread pool)", "concurrent/futures"),
    ("queue hop (thread pool)", "threading.py"),
    ("queue hop (thread pool)", "wrap_future"),
    ("queue hop (thread pool)", "call_soon_threadsafe"),
    ("queue hop (thread pool)", "_chain_future"),
    ("queue hop (thread pool)", "_copy_future_state"),
    ("queue hop (thread pool)", "_set_state"),
    ("gateway handler", "targets/serving/gateway.py"),
    ("HTTP (uvicorn, httptools)", "uvicorn/"),
    ("HTTP (uvicorn, httptools)", "httptools"),
    ("framework (FastAPI, Starlette)", "starlette/"),
    ("framework (FastAPI, Starlette)", "fastapi/"),
    ("framework (FastAPI, Starlette)", "pydantic"),
    ("event loop (asyncio, uvloop)", "asyncio/"),
    ("event loop (asyncio, uvloop)", "uvloop"),
)


# Leaves where a thread waits (py-spy --nonblocking cannot always tell idle threads): the event
# loop inside uvloop's C poll, a worker thread on its queue. Counted apart, never as work.
WAITING = "waiting (loop in poll, idle worker)"
_WAITING_LEAVES = ("Runner.run (asyncio/runners.py", "_worker (concurrent/futures/thread.py:81)")


def categorise(stack: str) -> str:
    """The category of one collapsed stack (frames joined by ';', root first)."""
    frames = stack.split(";")
    if frames[-1].startswith(_WAITING_LEAVES):
        return WAITING
    for frame in reversed(frames):
        for category, needle in CATEGORIES:
            if needle in frame:
                return category
    return "other"


def parse_raw(text: str) -> Counter:
    """Samples per category from py-spy's raw (collapsed) output: ``stack count`` per line."""
    counts: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[categorise(stack)] += int(count)
    return counts


def _client(host_port: str, path: str, bodies: list[bytes], stop: threading.Event, times_ns: list[int]) -> None:
    host, port = host_port.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    i = 0
    try:
        while not stop.is_set():
            started = time.perf_counter_ns()
            connection.request("POST", path, body=bodies[i % len(bodies)],
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"gateway answered {response.status}")
            times_ns.append(time.perf_counter_ns() - started)
            i += 1
    finally:
        connection.close()


def profile(model: str, seconds: float, concurrency: int, rate_hz: int, serve_args: list[str],
            raw_path: Path | None) -> dict:
    from targets.model.registry import resolve_model

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    spec = resolve_model(model)
    bodies = infer_bodies(spec.load_eval()[0], spec.input_name)
    gateway = GatewayProcess("--model", model, *(serve_args or ["--controller", "off"]))
    stop, threads, times = threading.Event(), [], [[] for _ in range(concurrency)]
    try:
        path = f"/v2/models/{spec.name}/infer"
        threads = [threading.Thread(target=_client, args=(gateway.host_port, path, bodies, stop, times[k]))
                   for k in range(concurrency)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # warm-up, not sampled
        before = sum(len(t) for t in times)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "raw.txt"
            started = time.monotonic()
            subprocess.run([py_spy, "record", "--pid", str(gateway.process.pid), "--rate", str(rate_hz),
                            "--duration", str(int(seconds)), "--format", "raw", "--nonblocking",
                            "--output", str(out)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            elapsed = time.monotonic() - started
            sampled = sum(len(t) for t in times) - before
            raw = out.read_text()
        if raw_path is not None:
            raw_path.write_text(raw)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        gateway.stop()
    latencies_ms = [ns / 1e6 for t in times for ns in t[len(t) // 10 :]]
    counts = parse_raw(raw)
    per_request_ms = {k: v / rate_hz / max(sampled, 1) * 1e3 for k, v in counts.items()}
    return {"model": model, "concurrency": concurrency, "requests": sampled, "seconds": elapsed,
            "requests_per_s": sampled / elapsed, "client_p50_ms": statistics.median(latencies_ms),
            "cpu_ms_per_request": per_request_ms, "samples": dict(counts), "rate_hz": rate_hz}


def print_table(result: dict) -> None:
    waiting = result["cpu_ms_per_request"].pop(WAITING, 0.0)
    total = sum(result["cpu_ms_per_request"].values())
    print(f"model {result['model']} · concurrency {result['concurrency']} · {result['requests']} requests in "
          f"{result['seconds']:.1f} s ({result['requests_per_s']:.0f}/s) · client p50 "
          f"{result['client_p50_ms']:.3f} ms · gateway CPU {total:.3f} ms per request "
          f"({result['rate_hz']} Hz samples)")
    print("| part | CPU ms per request | share |\n|---|---:|---:|")
    for category, ms in sorted(result["cpu_ms_per_request"].items(), key=lambda kv: -kv[1]):
        print(f"| {category} | {ms:.3f} | {ms / total:.0%} |")
    print(f"| {WAITING}: not counted above | {waiting:.3f} | |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m loadtests.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate-hz", type=int, default=1000)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.concurrency < 1 or args.rate_hz < 1:
        parser.error("--seconds must be >= 1, --concurrency and --rate-hz >= 1")
    print_table(profile(args.model, args.seconds, args.concurrency, args.rate_hz, serve_args, args.raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
