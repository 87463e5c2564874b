"""Dynamic batching on the event loop: requests that queue while the model runs share its next run.

A gateway on one CPU runs its small jobs on the event loop, one run at a time in arrival order
(``GatewaySettings.serial_on_loop``). A run then costs the model's fixed cost per call (ONNX
Runtime's dispatch, every stage's kernels) once per request; under load, the requests that
arrived during a run are merged into the next one (Triton's dynamic batcher with no added delay:
nothing waits for a batch to fill). At concurrency 1 every run holds one request, so nothing
changes there.

Contract: ``await batcher.submit(batch, labels)`` returns ``(outcomes, service_ms)``: the
request's outcomes, as ``run_many`` gave them, and the time of the run that answered it. Runs
take queued requests from the head, first come first served, those whose rows have the first
one's shape and dtype, up to ``max_rows`` rows (a request is never split; one larger than
``max_rows`` runs alone). An exception of a run is raised in every request of that run.
``run_many(batches, labels) -> list of outcomes per batch`` runs synchronously on the loop.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily


@dataclass
class _Job:
    batch: object
    labels: list | None
    future: asyncio.Future


class LoopBatcher:
    def __init__(self, run_many, max_rows: int):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.run_many, self.max_rows = run_many, max_rows
        self._queue: deque[_Job] = deque()
        self._busy = False
        self._drainer: asyncio.Task | None = None  # held: the loop keeps only weak references
        self.runs = 0  # model runs so far, and the requests and rows they answered
        self.requests = 0
        self.rows = 0

    async def submit(self, batch, labels=None):
        job = _Job(batch, labels, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if not self._busy:
            self._busy = True
            try:
                await asyncio.sleep(0)  # requests received in the same step of the loop join this run
                self._run_once()  # this job is at the head: the queue was empty when it came
            finally:
                if self._queue:
                    self._drainer = asyncio.get_running_loop().create_task(self._drain())
                else:
                    self._busy = False
        return await job.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # answers go out, arrived requests join the next run
                self._run_once()
        finally:
            self._busy = False

    def _take(self) -> list[_Job]:
        head = self._queue.popleft()
        jobs, rows = [head], len(head.batch)
        shape, dtype = head.batch.shape[1:], head.batch.dtype
        kept: deque[_Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # its request is gone
                continue
            fits = job.batch.shape[1:] == shape and job.batch.dtype == dtype
            if fits and rows + len(job.batch) <= self.max_rows:
                jobs.append(job)
                rows += len(job.batch)
            else:
                kept.append(job)
                if fits:  # full: the rest waits for the next run, in order
                    break
        kept.extend(self._queue)
        self._queue = kept
        return jobs

    def _run_once(self) -> None:
        jobs = [job for job in self._take() if not job.future.done()]
        if not jobs:
            return
        started_ns = time.perf_counter_ns()
        try:
            results = self.run_many([job.batch for job in jobs], [job.labels for job in jobs])
        except Exception as exc:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        service_ms = (time.perf_counter_ns() - started_ns) / 1e6
        self.runs += 1
        self.requests += len(jobs)
        self.rows += sum(len(job.batch) for job in jobs)
        for job, outcomes in zip(jobs, results):
            if not job.future.done():
                job.future.set_result((outcomes, service_ms))


class BatcherCollector:
    """The batcher's runs, and the requests and rows they answered, for Prometheus (the mean
    batch a run formed is rows / runs)."""

    def __init__(self, batcher: LoopBatcher):
        self.batcher = batcher

    def describe(self):
        return []

    def collect(self):
        for name, text, value in (
                ("green_mlops_dynamic_batch_runs", "Model runs of the event loop's dynamic batcher", self.batcher.runs),
                ("green_mlops_dynamic_batch_requests", "Requests those runs answered", self.batcher.requests),
                ("green_mlops_dynamic_batch_rows", "Rows those runs answered", self.batcher.rows)):
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family
