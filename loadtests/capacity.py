"""What the standard path can serve on this machine, measured before a load test is sized.

A spike that a fast machine takes in its stride overloads a slow one: with the same offered load
the standard run's queue grows without bound, its sends go out late, and the report rightly calls
the comparison INVALID. ``validate --load-arrival-rate auto`` (its default) therefore measures the
standard path first, as the load test will serve it, and sizes the open-loop base rate so that the
shape's peak asks for a fixed share of that capacity:

    base rate = min(ceiling, utilisation x 1000 / mean round trip ms / peak factor)

* The probe (:func:`probe_round_trips`) sends held-out rows one at a time over one keep-alive
  connection (bodies encoded beforehand) to the server the standard run will use: a gateway started
  with ``--controller off`` on the CPUs the load test gives the gateway, or Triton's ``<model>_full``.
  The mean round trip includes the HTTP floor and the client's own share, so the capacity it
  implies (1000 / mean ms requests per second) is a slight underestimate: the sizing errs on the
  side of a run that keeps up.
* ``utilisation`` (:data:`PEAK_UTILISATION`, 0.5): at the peak the standard path is busy half the
  time, so queueing shows (what bio's shorter service time saves) without a queue that never
  drains. The 40 requests/s the toolkit used as its fixed default was about this share on the
  2-core machine its figures were measured on (gateway round trip about 3 ms, spike 4x).
* ``ceiling`` (:data:`CEILING_RPS`, 40): a fast machine keeps the documented default load, so
  figures from different machines stay comparable and the load generator, on its own share of the
  CPUs, is never the bottleneck.
* The peak factor is the shape's largest load relative to its base
  (:attr:`loadtests.shapes.Shape.peak_factor`: 4 for the default spike).
* A run at a lower rate holds fewer requests, and the report needs enough of them (500 answered
  per run) to decide anything. So when the user gave neither the run length nor the phase length,
  both are stretched by ``ceiling / rate`` (at most :data:`MAX_STRETCH`): each run then holds about
  as many requests as at the ceiling, and takes longer.
"""
from __future__ import annotations

import http.client
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

AUTO_RATE = "auto"  # the value of --load-arrival-rate that asks for this sizing
PEAK_UTILISATION = 0.5  # share of the standard path's capacity the shape's peak asks for
CEILING_RPS = 40.0  # the auto-sized base rate never exceeds the documented default
DEFAULT_RUN_S = 15  # seconds per run, and one phase's length, when the user gives neither
DEFAULT_PHASE_S = 5.0
MAX_STRETCH = 4.0  # a run at an auto rate below the ceiling lasts up to this many times longer
PROBE_REQUESTS = 200  # timed requests, after the warm-up ones
PROBE_WARMUP = 20  # untimed requests first: first runs, allocations, connection set-up
PROBE_TIMEOUT_S = 30.0  # per request


class ProbeError(RuntimeError):
    """The probe could not measure: the server refused, failed or answered something else."""


@dataclass(frozen=True)
class RoundTrips:
    """One probe's figures: ``requests`` timed round trips, their mean and median in ms."""

    requests: int
    mean_ms: float
    p50_ms: float

    @property
    def capacity_rps(self) -> float:
        """Requests per second the server answers one after another: 1000 / mean round trip."""
        return 1000.0 / self.mean_ms


@dataclass(frozen=True)
class Sizing:
    """How the base arrival rate was chosen, for ``validate.json`` and the console."""

    arrival_rate_rps: float
    probe: RoundTrips
    target: str  # what was probed: "gateway --controller off" or "Triton digits_full"
    peak_factor: float
    utilisation: float
    ceiling_rps: float
    capped: bool  # the ceiling, not the machine, set the rate
    stretch: float = 1.0  # run and phase lengths multiplied by this (1: as given or default)

    @property
    def peak_utilisation(self) -> float:
        """Share of the measured capacity the shape's peak asks for at the chosen rate."""
        return self.arrival_rate_rps * self.peak_factor / self.probe.capacity_rps

    def as_dict(self) -> dict:
        return {"source": "auto", "arrival_rate_rps": self.arrival_rate_rps, "target": self.target,
                "probe": {**asdict(self.probe), "capacity_rps": round(self.probe.capacity_rps, 2)},
                "peak_factor": self.peak_factor, "utilisation": self.utilisation, "ceiling_rps": self.ceiling_rps,
                "capped": self.capped, "peak_utilisation": round(self.peak_utilisation, 3),
                "duration_stretch": round(self.stretch, 3)}

    def line(self) -> str:
        limit = (f"the ceiling of {self.ceiling_rps:g} req/s" if self.capped else
                 f"{100 * self.utilisation:.0f} % of that at the shape's {self.peak_factor:g}x peak")
        return (f"offered load sized to this machine: {self.arrival_rate_rps:g} req/s base ({self.target}: mean "
                f"round trip {self.probe.mean_ms:.2f} ms over {self.probe.requests} requests one at a time, "
                f"about {self.probe.capacity_rps:.0f} req/s; {limit}; peak asks for "
                f"{100 * self.peak_utilisation:.0f} % of it)"
                + (f"; runs and phases {self.stretch:.2f}x longer, to keep about as many requests"
                   if self.stretch > 1 else "") + "; --load-arrival-rate N to choose")


def size_arrival_rate(capacity_rps: float, peak_factor: float, utilisation: float = PEAK_UTILISATION,
                      ceiling_rps: float = CEILING_RPS) -> tuple[float, bool]:
    """``(base rate in requests/s, capped)``: ``utilisation`` of ``capacity_rps`` at the peak, at most
    ``ceiling_rps``, rounded down to 0.1 requests/s (at least 0.1)."""
    if not (capacity_rps > 0 and peak_factor > 0 and 0 < utilisation <= 1 and ceiling_rps > 0):
        raise ValueError("capacity, peak factor and ceiling must be > 0, utilisation in (0, 1]")
    wanted = utilisation * capacity_rps / peak_factor
    if wanted >= ceiling_rps:
        return float(ceiling_rps), True
    return max(0.1, float(np.floor(wanted * 10) / 10)), False


def duration_stretch(rate_rps: float, ceiling_rps: float = CEILING_RPS, max_stretch: float = MAX_STRETCH) -> float:
    """How much longer runs at ``rate_rps`` should last to hold about as many requests as at the
    ceiling: ``ceiling / rate``, between 1 and ``max_stretch``."""
    return float(min(max_stretch, max(1.0, ceiling_rps / rate_rps)))


def infer_bodies(x: np.ndarray, input_name: str, n: int = PROBE_REQUESTS) -> list[bytes]:
    """KServe v2 JSON bodies, one row each, for the first ``n`` rows of ``x`` (FP32 or INT64)."""
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[x.dtype]
    return [json.dumps({"inputs": [{"name": input_name, "shape": [1, *x.shape[1:]], "datatype": datatype,
                                    "data": x[i : i + 1].ravel().tolist()}]}).encode()
            for i in range(min(n, len(x)))]


def probe_round_trips(host_port: str, path: str, bodies: list[bytes], requests: int = PROBE_REQUESTS,
                      warmup: int = PROBE_WARMUP) -> RoundTrips:
    """Send ``warmup`` then ``requests`` bodies (cycling) one at a time on one keep-alive
    connection to ``http://host_port/path``; every answer must be 200 (else :class:`ProbeError`)."""
    if requests < 1 or warmup < 0 or not bodies:
        raise ValueError("the probe needs bodies and at least one timed request")
    host, port = host_port.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=PROBE_TIMEOUT_S)
    times_ns = []
    try:
        for i in range(warmup + requests):
            started = time.perf_counter_ns()
            try:
                connection.request("POST", path, body=bodies[i % len(bodies)],
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise ProbeError(f"the capacity probe could not reach {host_port}{path}: {exc}") from exc
            if response.status != 200:
                raise ProbeError(f"the capacity probe got HTTP {response.status} from {host_port}{path}: "
                                 f"{payload[:200].decode(errors='replace')}")
            if i >= warmup:
                times_ns.append(time.perf_counter_ns() - started)
    finally:
        connection.close()
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    return RoundTrips(requests=len(ms), mean_ms=round(float(ms.mean()), 4), p50_ms=round(float(np.median(ms)), 4))
