"""Dynamic batching on the event loop (targets.serving.loop_batcher) and the shared ladder run it relies on
(ControlledTarget.predict_many); the infer lane below the framework (targets.serving.infer_lane)."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from targets.control.controlled import ControlledTarget
from targets.control.controller_config import build_config
from targets.errors import BackendError, InputError
from targets.serving.loop_batcher import LoopBatcher
from targets.control.make_controller import make_controller
from tests.test_gateway import infer_body


def rows(n: int, width: int = 3, value: float = 0.0) -> np.ndarray:
    return np.full((n, width), value, dtype=np.float32)


class Recorder:
    """A run_many that records each run's batches and answers each row with its first value."""

    def __init__(self, fail_on: float | None = None):
        self.runs: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, batches, labels):
        self.runs.append([len(b) for b in batches])
        if self.fail_on is not None and any((b == self.fail_on).any() for b in batches):
            raise BackendError("planted failure")
        return [[float(r[0]) for r in b] for b in batches]


def gather(batcher, *batches):
    async def main():
        return await asyncio.gather(*(batcher.submit(b) for b in batches), return_exceptions=True)

    return asyncio.run(main())


def test_one_request_alone_runs_alone():
    recorder = Recorder()
    (outcomes, service_ms), = gather(LoopBatcher(recorder, 32), rows(2, value=7))
    assert outcomes == [7.0, 7.0] and service_ms >= 0 and recorder.runs == [[2]]


def test_requests_queued_together_share_a_run_in_arrival_order():
    recorder = Recorder()
    batcher = LoopBatcher(recorder, 32)
    results = gather(batcher, *(rows(1, value=v) for v in range(5)))
    assert [outcomes for outcomes, _ in results] == [[0.0], [1.0], [2.0], [3.0], [4.0]]
    assert recorder.runs == [[1, 1, 1, 1, 1]]
    assert (batcher.runs, batcher.requests, batcher.rows) == (1, 5, 5)


def test_a_run_takes_at_most_max_rows_and_never_splits_a_request():
    recorder = Recorder()
    results = gather(LoopBatcher(recorder, 4), rows(3), rows(2), rows(1), rows(5))
    assert all(not isinstance(r, BaseException) for r in results)
    assert recorder.runs == [[3], [2, 1], [5]]  # 3+2 > 4; the 5-row request runs alone


def test_rows_of_another_shape_wait_for_a_run_of_their_own():
    recorder = Recorder()
    gather(LoopBatcher(recorder, 32), rows(1, width=3), rows(1, width=4), rows(1, width=3), rows(1, width=4))
    assert recorder.runs == [[1, 1], [1, 1]]


def test_a_failed_run_fails_its_requests_only_and_the_batcher_goes_on():
    recorder = Recorder(fail_on=9.0)
    batcher = LoopBatcher(recorder, 2)
    results = gather(batcher, rows(1, value=9), rows(1, value=1), rows(1, value=2))
    assert isinstance(results[0], BackendError) and isinstance(results[1], BackendError)
    assert results[2][0] == [2.0]
    (outcomes, _), = gather(batcher, rows(1, value=3))  # not stuck
    assert outcomes == [3.0]


def test_a_cancelled_request_does_not_stall_the_queue():
    recorder = Recorder()
    batcher = LoopBatcher(recorder, 32)

    async def main():
        first = asyncio.ensure_future(batcher.submit(rows(1, value=1)))
        second = asyncio.ensure_future(batcher.submit(rows(1, value=2)))
        await asyncio.sleep(0)
        first.cancel()
        answered = await second
        third = await batcher.submit(rows(1, value=3))
        return answered, third

    answered, third = asyncio.run(main())
    assert answered[0] == [2.0] and third[0] == [3.0]


# --- predict_many: the same answers and decisions as one request at a time ---------------------


def _controller(spec, backend, policy: str):
    overrides = {"policy": policy, "k_per_s": 1e6, "gamma": 0.0, "beta": 0.0}
    if policy == "paper":
        overrides["tau_inf"] = 0.5
    return make_controller(build_config(spec.controller_hints, overrides=overrides), spec, backend)


@pytest.mark.parametrize("policy", [None, "paper", "budget"])
def test_predict_many_answers_as_one_request_at_a_time(digits_spec, digits_backend, digits_eval, policy):
    x, _ = digits_eval
    requests = [x[0:1], x[1:4], x[4:5], x[5:9]]
    one = ControlledTarget(digits_backend, None if policy is None else _controller(digits_spec, digits_backend, policy))
    many = ControlledTarget(digits_backend, None if policy is None else _controller(digits_spec, digits_backend, policy))
    alone = [one.predict(r) for r in requests]
    shared = many.predict_many(requests)
    assert [len(o) for o in shared] == [len(r) for r in requests]
    for a, b in zip(alone, shared):
        for oa, ob in zip(a, b):
            assert ob.stage == oa.stage and ob.action == oa.action
            np.testing.assert_allclose(ob.probabilities, oa.probabilities, rtol=1e-4, atol=1e-5)
            if oa.decision is not None and oa.decision.threshold is not None:
                assert ob.decision.path_index == oa.decision.path_index


def test_predict_many_refuses_a_batch_that_does_not_fit_before_any_model_work(digits_spec, digits_backend,
                                                                              digits_eval):
    x, _ = digits_eval
    with pytest.raises(InputError):
        ControlledTarget(digits_backend, None).predict_many([x[0:1], np.zeros((1, 3), np.float32)])


# --- the gateway: a pinned (serial) gateway merges concurrent requests, bad input fails alone --


def test_a_serial_gateway_merges_queued_requests_and_answers_each_as_alone(digits_spec, digits_backend,
                                                                           digits_eval):
    from targets.serving.gateway import GatewaySettings, create_app

    x, _ = digits_eval
    settings = GatewaySettings(serial_on_loop=True, dynamic_batch_rows=32)
    app = create_app(digits_spec, digits_backend, None, settings)
    bodies = [infer_body(x[i : i + 1]) for i in range(12)]
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            calls = [client.post("/v2/models/digits/infer", json=b) for b in bodies[:6]]
            calls.append(client.post("/v2/models/digits/infer", json=bad))
            calls += [client.post("/v2/models/digits/infer", json=b) for b in bodies[6:]]
            answers = await asyncio.gather(*calls)
            metrics = (await client.get("/metrics")).text
            return answers, metrics

    answers, metrics = asyncio.run(main())
    assert answers[6].status_code == 400 and "error" in answers[6].json()
    good = answers[:6] + answers[7:]
    assert all(a.status_code == 200 for a in good)
    expected = digits_backend.full_probabilities(x[:12])
    for i, answer in enumerate(good):
        np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected[i], rtol=1e-4, atol=1e-5)
    batcher = app.state.batcher
    assert batcher.requests == 12 and batcher.runs < 12  # some requests shared a run
    assert "green_mlops_dynamic_batch_requests_total 12.0" in metrics


def test_the_infer_lane_answers_a_handler_bug_with_json_500_and_passes_other_posts_on():
    from fastapi import FastAPI

    from targets.serving.infer_lane import InferLane

    app = FastAPI()

    @app.post("/v2/other")
    async def other():
        return {"other": True}

    async def broken(name, scope, receive):
        raise RuntimeError("planted")

    observed = []
    app.add_middleware(InferLane, handle=broken, observe=lambda *a: observed.append(a))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
            return (await client.post("/v2/models/m/infer", content=b"{}"),
                    await client.post("/v2/other"),
                    await client.post("/v2/models/m/versions/3/infer", content=b"{}"))

    bug, passed_on, versioned = asyncio.run(main())
    assert bug.status_code == 500 and bug.json()["error"] == "internal error: RuntimeError: planted"
    assert passed_on.status_code == 200 and passed_on.json() == {"other": True}
    assert versioned.status_code == 500  # the versioned path is the lane's too
    assert [o[0] for o in observed] == [500, 500]
