"""CPU sets: who runs where, so that a load generator and the server it measures do not share cores.

Linux only (``os.sched_setaffinity``); elsewhere every function answers "no pinning" and nothing
is pinned. Numbers are the kernel's CPU ids.
"""
from __future__ import annotations

import os

PIN_ENV = "GREEN_MLOPS_PIN"


def available_cpus() -> list[int]:
    """The CPUs this process may run on, sorted (all of them where affinity is not supported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def cpu_list(cpus) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5`` (the form of ``taskset -c``)."""
    cpus, parts = sorted(cpus), []
    for cpu in cpus:
        if parts and cpu == parts[-1][1] + 1:
            parts[-1][1] = cpu
        else:
            parts.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def split_for_load_test(cpus: list[int] | None = None) -> tuple[list[int], list[int]] | None:
    """``(load generator's CPUs, server's CPUs)``: disjoint halves of ``cpus`` (default: this
    process's), the server taking the larger half; None when fewer than 2 CPUs are available,
    pinning is not supported, or ``GREEN_MLOPS_PIN=0`` (then both share every CPU: on a machine
    whose cores other work keeps busy, a pinned process cannot move away from it)."""
    if not hasattr(os, "sched_setaffinity") or os.environ.get(PIN_ENV, "1") == "0":
        return None
    cpus = available_cpus() if cpus is None else sorted(cpus)
    if len(cpus) < 2:
        return None
    generator = len(cpus) // 2
    return cpus[:generator], cpus[generator:]


def serving_threads(cpus: list[int] | None = None) -> int:
    """ONNX Runtime intra-op threads per session for a server on ``cpus`` (default: this
    process's): one per CPU of its share. A request that runs alone gets every core of the share
    (batch-1 latency: digits 2.7 ms through the gateway with 2 threads on an idle 2-core machine,
    4.1 ms with 1); requests that run at once share them, and threads never spin-wait (see
    ``OnnxRuntimeTarget``), so an idle one costs no CPU. A gateway pinned to one CPU gets 1."""
    return max(1, len(available_cpus() if cpus is None else cpus))


def pin_to(cpus: list[int]):
    """A ``preexec_fn`` for ``subprocess.Popen`` that pins the child to ``cpus`` (None: no-op)."""
    def pin() -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
    return pin
