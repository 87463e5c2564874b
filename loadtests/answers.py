"""What a load test reads from a server's answer: the outcome of a request (answered, rejected by
the controller, failed with a reason) and the answer's figures, from the gateway or from Triton
(``<model>_full``, or ``<model>_bio`` whose outputs and refusals read as the gateway's).
Imports neither Locust nor gevent, so it can be tested and reused outside a locustfile."""
from __future__ import annotations

import json

from targets.serving.triton_bio import refused_by_triton_bio, triton_bio_parameters


def outcome_of(status: int, answer: dict, error) -> tuple[str, str | None]:
    """``answered``, ``rejected`` (the controller's 503, which names its action: ``reject`` or ``shed``) or ``failed``
    with a reason (a backend 503, any other status, a timeout, a refused or reset connection)."""
    if status == 200:
        return "answered", None
    if status == 503 and answer.get("parameters", {}).get("action") in ("reject", "shed"):
        return "rejected", None  # skip action 'reject', or shed by the budget policy's SLO loop
    if status >= 400 and refused_by_triton_bio(answer.get("error") if isinstance(answer, dict) else None):
        return "rejected", None  # the same refusals, by the controller inside Triton
    if status == 0:
        return "failed", f"{type(error).__name__}: {error}" if error is not None else "no response"
    message = answer.get("error") if isinstance(answer, dict) else None
    return "failed", f"HTTP {status}" + (f": {message}" if message else "")


def parse_answer(content: bytes | None) -> dict:
    """The answer as a dict, with ``predicted`` (the class of the first output, or of Triton's
    bio model's ``probabilities``); a Triton bio answer's ``exit_stage``, ``path_index`` and
    ``action`` outputs become the ``parameters`` the gateway would have sent; a Triton refusal's
    action is read from its error message."""
    try:
        document = json.loads(content or b"{}")
    except ValueError:
        return {}
    if not isinstance(document, dict):
        return {}
    outputs = [o for o in document.get("outputs") or [] if isinstance(o, dict)]
    by_name = {o.get("name"): o.get("data") for o in outputs}
    scores = by_name.get("probabilities") if "exit_stage" in by_name else (outputs[0].get("data") if outputs else None)
    if scores:
        document["predicted"] = max(range(len(scores)), key=scores.__getitem__)
    if "exit_stage" in by_name:
        document["parameters"] = triton_bio_parameters(by_name)
    refusal = refused_by_triton_bio(document.get("error"))
    if refusal is not None:
        document.setdefault("parameters", {})["action"] = refusal
    return document
