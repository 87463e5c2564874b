"""wrk (the C load generator, Debian package ``wrk``) driving a gateway with held-out rows.

``run_wrk`` posts the given KServe v2 JSON bodies in turn over ``connections`` keep-alive
connections for ``duration_s`` (closed loop: each connection sends its next request when the
answer arrives) and returns wrk's own figures: requests per second, p50 latency, non-2xx answers
and socket errors. ``cpus`` pins wrk (``taskset``-style, through the kernel's affinity).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from targets.cpus import pin_to

LUA = """
local bodies = {}
for line in io.lines(%(bodies)q) do bodies[#bodies + 1] = line end
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, %(path)q, nil, bodies[(counter %% #bodies) + 1])
end
"""
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS_MS[unit]


def parse_output(text: str) -> dict:
    """wrk's figures from its ``--latency`` report."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if rate is None or p50 is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text[-2000:]}")
    return {"requests_per_s": float(rate.group(1)), "p50_ms": _ms(p50.group(1)),
            "requests": int(total.group(1)), "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0}


def run_wrk(url: str, path: str, bodies: list[bytes], connections: int = 16, duration_s: float = 3.0,
            threads: int = 1, cpus: list[int] | None = None) -> dict:
    """Run wrk against ``url`` + ``path``; RuntimeError when wrk is missing or fails."""
    binary = wrk_path()
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    if any(b"\n" in body for body in bodies):
        raise ValueError("bodies must be one line each")
    with tempfile.TemporaryDirectory(prefix="green-mlops-wrk-") as tmp:
        bodies_file, script = Path(tmp) / "bodies.jsonl", Path(tmp) / "post.lua"
        bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
        script.write_text(_lua(str(bodies_file), path))
        done = subprocess.run([binary, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s",
                               "--latency", "-s", str(script), url], capture_output=True, text=True,
                              timeout=duration_s + 60, preexec_fn=pin_to(cpus) if cpus else None)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return parse_output(done.stdout)


def _lua(bodies_file: str, path: str) -> str:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return LUA.replace("%(bodies)q", quoted(bodies_file)).replace("%(path)q", quoted(path)).replace("%%", "%")
