"""The in-process ablation's figures from planted per-request results: latency is compared over the
requests bio answered (a refusal costs no model time and is no saving), refusals are scored wrong."""
from __future__ import annotations

import numpy as np
import pytest

from loadtests.ablation import AblationResult, ModeRun
from reports.ablation import summarise


class _Outcome:
    def __init__(self, action: str, probabilities):
        self.action, self.probabilities, self.decision, self.stage = action, probabilities, None, None


def _run(mode: str, rows: list[tuple[float, str]]) -> ModeRun:
    run = ModeRun(mode, wall_s=1.0)
    for latency_ms, action in rows:
        refused = action in ("reject", "shed")
        run.record(latency_ms, _Outcome(action, None if refused else np.array([0.1, 0.9])))
    return run


@pytest.mark.parametrize("refusal", ["reject", "shed"])
def test_refused_requests_neither_shorten_latency_nor_count_as_right(refusal):
    n = 200
    standard = _run("standard", [(10.0, "full")] * n)
    # Bio answers every other request in 4 ms (a 60 % saving) and refuses the rest in 0.01 ms.
    bio = _run("bio", [(4.0, "exit") if i % 2 == 0 else (0.01, refusal) for i in range(n)])
    result = AblationResult(standard, bio, request_index=np.arange(n) % 50, labels=np.ones(n, dtype=int),
                            oracle_agree=np.ones(n, dtype=bool), warmup_standard=0, warmup_bio=0, tau_settled=True)
    summary = summarise(result, "CPUExecutionProvider", "planted", {})
    assert summary["latency_reduction_pct"] == pytest.approx(60.0)
    assert summary["bio"]["answered"] == n // 2 and summary["bio"]["mean_latency_ms"] == pytest.approx(4.0)
    assert summary["accuracy_loss_pp"] == pytest.approx(50.0)  # every refusal scored as wrong
