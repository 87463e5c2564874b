"""From recorded runs to figures, the standard-vs-bio comparison, the claims verdict, validity
rules (in the spirit of MLPerf LoadGen) and regressions against a baseline summary.

Pure functions of the runs: no I/O, no plotting. The rules (see the README, "Reading a report"):

* **Same conditions or no comparison**: model, provider, shape and its parameters, open or
  closed loop, arrival rate and schedule must match, else INVALID, naming the difference.
* **Equal offered load**: only an open-loop pair replaying one schedule decides a claim; a
  closed-loop comparison is shown, labelled "unequal offered load", its claims not measurable.
* **Paired accuracy**: each bio request is compared with the full model's answer for the same
  evaluation row (``reference.json``); a rejection is scored as wrong; the interval is a cluster
  bootstrap over evaluation rows.
* **Warm-up**: requests sent before τ(t) is within 1 % of (τ0 − τ∞) of τ∞ in the bio run are
  excluded from the claims, over the same time span in both runs, and shown.
* **Nothing hidden**: failures above 0.1 % of the requests sent, an achieved rate more than 5 %
  below the requested one, or more than 1 % of sends late make a run INVALID.
* **Estimates stay estimates**: an energy claim resting on an estimate is not measurable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from reports.ablation import CLAIM_TOLERANCE, PAPER_ACCURACY_LOSS_PP, PAPER_LATENCY_REDUCTION_PCT, undecided_text
from reports.records import ANSWERED, REJECTED, outcome, phase_summary, request_figures
from reports.runs import Run
from reports.bounds import (ALPHA, HELD, INCONCLUSIVE, NOT_HELD, NOT_MEASURABLE, STATUS_WORDS, accuracy_loss_bounds,
                            decide_at_least, decide_at_most, n_to_decide_at_least, ratio_reduction_bounds,
                            replicate_bounds, rows_to_decide_loss, wider)
from reports.stats import independent_bootstrap_ci, reduction_pct

PAIRING_BLOCK_S = 1.0  # under load, the latency bound resamples whole seconds of the schedule (queues carry over)
MAIN_BIO_NAME = re.compile(r"bio(-r\d+)?")  # bio, bio-r2, bio-r3 …: validate's replicates (bio-<policy>: comparisons)
REPLICATE_NAME = re.compile(r"(standard|bio)-r\d+")  # the runs of replicates 2, 3, …
SETTLE_FRACTION = 0.01  # τ counts as settled within 1 % of (τ0 − τ∞) of τ∞, as in the ablation
# Conditions two runs must share to be compared (run.json keys).
SAME_CONDITIONS = ("model", "provider", "backend", "shape", "shape_params", "open_loop", "arrival_rate_rps")


@dataclass(frozen=True)
class ValidityRules:
    min_duration_s: float = 10.0  # per run
    min_requests: int = 500  # answered, per run
    max_late_fraction: float = 0.01  # open loop: sends on the wire late
    max_failure_fraction: float = 0.001  # failed requests of those sent
    min_achieved_fraction: float = 0.95  # open loop: requests sent of those scheduled
    stability_windows: int = 3  # last whole seconds whose throughput must agree
    max_stability_cv: float = 0.25  # coefficient of variation of those seconds' throughput


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the baseline a figure may get before ``--gate`` fails."""

    latency_reduction_pp: float = 5.0
    energy_reduction_pp: float = 5.0
    accuracy_loss_pp: float = 0.25


def _answered(records: list[dict]) -> list[dict]:
    return [r for r in records if outcome(r) == ANSWERED]


def energy_label(windows: list[dict], key: str = "energy_source") -> str:
    """Every source that contributed to a run's figure, joined (a mixed run says so)."""
    labels = sorted({w.get(key) or "none" for w in windows})
    return "+".join(labels) if labels else "none"


def is_estimate(label: str) -> bool:
    """An energy label that rests, in part, on an estimate (CodeCarbon's model of power)."""
    return label == "none" or "estimated" in label


def _gpu_only(windows: list[dict]) -> list[dict] | None:
    """Where NVML read every window: the windows with their GPU energy alone (the system under
    test's accelerator; the load generator uses none of it). None otherwise."""
    gpu = []
    for w in windows:
        readings = [r for r in w.get("sources") or [] if r.get("source") == "nvml" and r.get("energy_j") is not None]
        if not readings:
            return None
        gpu.append({**w, "energy_j": sum(r["energy_j"] for r in readings), "energy_source": "measured:nvml"})
    return gpu or None


def _energy(run: Run, answered: int) -> dict:
    windows = [w for w in run.windows if w.get("energy_j") is not None]
    co2_windows = [w for w in run.windows if w.get("co2_g") is not None]
    # NVML separates the system under test from Locust; RAPL and CodeCarbon read the whole machine.
    gpu = _gpu_only(windows)
    machine_j = sum(w["energy_j"] for w in windows) if windows else None
    if gpu is not None:
        windows = gpu
    energy_j = sum(w["energy_j"] for w in windows) if windows else None
    source = energy_label(windows) if windows else "none"
    return {
        "energy_per_request_j": energy_j / answered if energy_j is not None and answered else None,
        "energy_source": source,
        "energy_includes_load_generator": None if not windows else gpu is None,
        "machine_energy_per_request_j": machine_j / answered if machine_j is not None and answered else None,
        "co2_g_per_1k_requests": 1000 * sum(w["co2_g"] for w in co2_windows) / answered
        if co2_windows and answered else None,
        "co2_source": energy_label(co2_windows, "co2_source") if co2_windows and
        all("co2_source" in w for w in co2_windows) else ("estimated:codecarbon" if co2_windows else "none"),
    }


def run_figures(run: Run) -> dict:
    """The figures of one run: conditions, outcomes, throughput, latency, accuracy, energy."""
    records = run.records
    m = run.metadata
    figures = request_figures(records)
    schedule = m.get("schedule") or None
    sent_on_wire = sum(r.get("t_sent") is not None for r in records)
    return {
        "name": run.name,
        "scenario": run.scenario,
        "conditions": {k: m.get(k) for k in ("model", "provider", "backend", "controller", "shape",
                                             "shape_params", "open_loop", "arrival_rate_rps", "host",
                                             "versions", "machine", "started_at", "ended_at")},
        "finished": m.get("finished", True),
        "schedule": schedule,
        "sent": sent_on_wire,
        "achieved_fraction": sent_on_wire / schedule["n_scheduled"] if schedule and schedule.get("n_scheduled")
        else None,
        "achieved_rps": sent_on_wire / schedule["duration_s"] if schedule and schedule.get("duration_s") else None,
        **figures,
        **_energy(run, figures["answered"]),
        "phases": phase_summary(records) if records else [],
    }


def _pick(runs: list[Run], scenario: str) -> Run | None:
    matching = [r for r in runs if r.scenario == scenario and r.records]
    return matching[-1] if matching else None


def condition_differences(standard: Run, bio: Run) -> list[str]:
    """What differs between two runs' conditions (empty: they may be compared)."""
    differences = []
    for key in SAME_CONDITIONS:
        a, b = standard.metadata.get(key), bio.metadata.get(key)
        if a != b:
            differences.append(f"{key}: standard {a!r} vs bio {b!r}")
    digest = [(r.metadata.get("schedule") or {}).get("digest") for r in (standard, bio)]
    if digest[0] != digest[1]:
        differences.append(f"arrival schedule: standard {digest[0]} vs bio {digest[1]}")
    return differences


def warmup_s(bio: Run) -> tuple[float, str]:
    """Seconds after the start in which the bio run's τ(t) had not yet settled, and how that was
    decided. τ0 and τ∞ come from the gateway's state recorded at the end of the run."""
    config = ((bio.metadata.get("controller_state_at_end") or {}).get("config")) or {}
    taus = sorted((r["offset_s"], r["tau"]) for r in bio.records
                  if r.get("tau") is not None and r.get("offset_s") is not None)
    if not taus:
        return 0.0, "no τ recorded: nothing excluded"
    if "tau0" not in config or "tau_inf" not in config:
        return 0.0, "τ0/τ∞ unknown (the gateway's state was not recorded): nothing excluded"
    tau0, tau_inf = config["tau0"], config["tau_inf"]
    if config.get("k_per_s") == 0 or tau0 == tau_inf:
        return 0.0, "τ is constant: no warm-up"
    bound = SETTLE_FRACTION * abs(tau0 - tau_inf)
    settled = [offset for offset, tau in taus if abs(tau - tau_inf) <= bound]
    if not settled:
        return float("inf"), f"τ(t) never came within {bound:.4f} of τ∞ = {tau_inf:.4f}"
    return float(settled[0]), f"until τ(t) within {bound:.4f} of τ∞ = {tau_inf:.4f}"


def _measured(run: Run, since_s: float) -> list[dict]:
    return [r for r in run.records if r.get("offset_s") is None or r["offset_s"] >= since_s]


def _paired_accuracy(bio_measured: list[dict], reference: dict, standard: list[dict] | None = None) -> dict | None:
    """Accuracy loss of bio against the full model on the same rows, with one-sided 95 % bounds:
    the wider of exact Clopper–Pearson on the rows harmed and fixed and a cluster bootstrap by row.
    A row sent with a planted drift (``drifted``) is another input than the reference's: it is
    paired with the ``standard`` run's answer to the same request (same schedule, same input),
    or left out when there is none."""
    scored = [r for r in bio_measured if outcome(r) in (ANSWERED, REJECTED)]
    standard_by_seq = {r["seq"]: r for r in standard or () if r.get("drifted") and outcome(r) == ANSWERED}
    scored = [r for r in scored if not r.get("drifted") or r.get("seq") in standard_by_seq]
    if not scored:
        return None
    labels, full = np.asarray(reference["label"]), np.asarray(reference["full_predicted"])
    rows = np.array([r["row"] if not r.get("drifted") else -1 - r["row"] for r in scored])
    full_correct = np.array([bool(standard_by_seq[r["seq"]]["correct"]) if r.get("drifted")
                             else full[r["row"]] == labels[r["row"]] for r in scored], dtype=float)
    bio_correct = np.array([bool(r["correct"]) for r in scored], dtype=float)
    loss = accuracy_loss_bounds(full_correct, bio_correct, rows)
    return {"accuracy_loss_pp": loss["accuracy_loss_pp"], "accuracy_loss_bounds95_pp": loss["accuracy_loss_bounds_pp"],
            "accuracy_loss_detail": loss, "accuracy_paired": True,
            "full_accuracy_same_rows": float(full_correct.mean()),
            "bio_accuracy": float(bio_correct.mean()), "n_scored": len(scored),
            "rows_covered": int(len(np.unique(rows))),
            "drifted_rows_paired_with_standard": sum(bool(r.get("drifted")) for r in scored),
            "rejected_scored_wrong": sum(outcome(r) == REJECTED for r in scored)}


def _reference_agreement(standard_measured: list[dict], reference: dict) -> float | None:
    """Share of standard's answers equal to the reference's full answer (1.0: same model)."""
    answered = [r for r in _answered(standard_measured) if not r.get("drifted")]  # a drifted row is another input
    if not answered:
        return None
    full = reference["full_predicted"]
    return sum(r["predicted"] == full[r["row"]] for r in answered) / len(answered)


def _main_bios(runs: list[Run]) -> list[Run]:
    """The bio runs the claims rest on: those named ``bio`` or ``bio-rN`` (validate's replicates),
    else the last bio run; a ``bio-<policy>`` run is a policy comparison."""
    named = [r for r in runs if r.scenario == "bio" and MAIN_BIO_NAME.fullmatch(r.name) and r.records]
    if named:
        return named
    last = _pick(runs, "bio")
    return [last] if last is not None else []


def _digest(run: Run) -> str | None:
    return (run.metadata.get("schedule") or {}).get("digest")


def replicate_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Standard and main bio runs that replayed one open-loop schedule (equal digests), one pair
    per replicate, in the order of the standard runs. Empty when no schedule pairs them."""
    bios = _main_bios(runs)
    pairs = []
    for standard in (r for r in runs if r.scenario == "standard" and r.records):
        digest = _digest(standard)
        partners = [b for b in bios if digest is not None and _digest(b) == digest]
        if partners:
            pairs.append((standard, partners[-1]))
    return pairs


def compare(runs: list[Run]) -> dict | None:
    """Standard vs bio: over every replicate when the load stage was repeated (see
    :func:`combine_replicates`), else the last standard run against the main bio run; None without both."""
    pairs = replicate_pairs(runs)
    if len(pairs) >= 2:
        return combine_replicates(pairs)
    if pairs:
        return compare_pair(*pairs[0])
    standard, bios = _pick(runs, "standard"), _main_bios(runs)
    if standard is None or not bios:
        return None
    return compare_pair(standard, bios[-1])


def combine_replicates(pairs: list[tuple[Run, Run]]) -> dict:
    """Standard vs bio over R replicates of the load stage (each its own schedule, both modes on
    it): the latency reduction is the mean of the replicates' paired reductions, its bounds the
    wider of a Student-t bound over the replicates (run-to-run variation) and the replicates'
    own paired bounds shrunk by √R; the accuracy loss pools every replicate's bio requests, paired
    with the full model on their rows. The other figures are the first replicate's."""
    comparisons = [compare_pair(standard, bio) for standard, bio in pairs]
    combined = dict(comparisons[0])
    reductions = [c["latency_reduction_pct"] for c in comparisons]
    combined["replicates"] = [
        {"standard_run": c["standard_run"], "bio_run": c["bio_run"], "schedule_digest": _digest(pair[0]),
         "schedule_seed": (pair[0].metadata.get("schedule") or {}).get("seed"),
         "latency_reduction_pct": c["latency_reduction_pct"],
         "latency_reduction_bounds95_pct": c["latency_reduction_bounds95_pct"],
         "accuracy_loss_pp": c.get("accuracy_loss_pp"), "warmup_s": c["warmup_s"],
         "n_pairs": c["n_pairs"], "condition_differences": c["condition_differences"]}
        for c, pair in zip(comparisons, pairs)]
    combined["n_replicates"] = len(pairs)
    combined["run_to_run_included"] = True
    combined["condition_differences"] = [f"replicate {k}: {d}" for k, c in enumerate(comparisons, start=1)
                                         for d in c["condition_differences"]]
    if combined["condition_differences"]:
        return combined
    if any(r is None for r in reductions):
        combined["latency_reduction_pct"], combined["latency_reduction_bounds95_pct"] = None, None
    else:
        point = float(np.mean(reductions))
        shrink = 1 / np.sqrt(len(reductions))
        lower = point - shrink * float(np.mean([r - c["latency_reduction_bounds95_pct"][0]
                                                for r, c in zip(reductions, comparisons)]))
        upper = point + shrink * float(np.mean([c["latency_reduction_bounds95_pct"][1] - r
                                                for r, c in zip(reductions, comparisons)]))
        between = replicate_bounds(reductions)
        combined["latency_reduction_pct"] = point
        combined["latency_reduction_bounds95_pct"] = list(wider((lower, upper), between))
        combined["latency_reduction_replicate_sd_pct"] = float(np.std(reductions, ddof=1))
        combined["latency_bound_method"] = (f"Student-t over {len(reductions)} replicates (run-to-run variation), "
                                            "or the replicates' paired block bootstraps if wider")
    combined["n_standard"] = sum(c["n_standard"] for c in comparisons)
    combined["n_bio"] = sum(c["n_bio"] for c in comparisons)
    combined["n_pairs"] = sum(c["n_pairs"] for c in comparisons)
    reference = next((b.reference or s.reference for s, b in pairs if b.reference or s.reference), None)
    if reference is not None and all(c.get("accuracy_paired") for c in comparisons):
        pooled = [r for (_, bio), c in zip(pairs, comparisons) for r in _measured(bio, c["warmup_s"] or 0.0)]
        drifted = [r for standard, _ in pairs for r in standard.records if r.get("drifted")]
        combined.update(_paired_accuracy(pooled, reference, drifted) or {})
    return combined


def run_policy(run: Run) -> str:
    """The controller policy a bio run's gateway used (``paper`` for runs recorded before policies)."""
    return (run.metadata.get("controller_state_at_end") or {}).get("policy") or "paper"


def policy_comparisons(runs: list[Run]) -> list[dict]:
    """Every bio run against the same standard run, one row each, with whether it held its budget
    and its latency SLO: how the policies compare under the same schedule."""
    standards = [r for r in runs if r.scenario == "standard" and r.records]
    if not standards:
        return []
    rows = []
    # Replicate 1's bio and the bio-<policy> runs on its schedule; later replicates (bio-rK) only
    # repeat the main policy, and their figures are in the comparison's replicates.
    for bio in (r for r in runs if r.scenario == "bio" and r.records and not REPLICATE_NAME.fullmatch(r.name)):
        # Each bio run against the standard run that replayed its schedule (else the last one).
        standard = next((s for s in reversed(standards) if _digest(s) is not None and _digest(s) == _digest(bio)),
                        standards[-1])
        c = compare_pair(standard, bio)
        state = bio.metadata.get("controller_state_at_end") or {}
        budget = state.get("budget") or {}
        certificate = budget.get("certificate") or {}
        slo = budget.get("slo") or {}
        budget_pp = certificate.get("budget_pp")
        loss = c.get("accuracy_loss_pp")
        # Accuracy the controller spent, refusals inside the promise: the paired loss over every
        # scored request, a shed or rejected one scored wrong (the certificate assumes every row
        # gets an answer); the loss over answers alone is kept beside it.
        spent_all = answered = None
        if bio.reference or standard.reference:
            reference = bio.reference or standard.reference
            measured = _measured(bio, c["warmup_s"] or 0.0)
            spent_all = _paired_accuracy(measured, reference, standard.records)
            answered = _paired_accuracy([r for r in measured if outcome(r) == ANSWERED], reference, standard.records)
        spent = None if spent_all is None else spent_all["accuracy_loss_pp"]
        bio_p95 = request_figures(_measured(bio, c["warmup_s"] or 0.0))["p95_ms"]
        shed = sum(1 for r in bio.records if r.get("action") == "shed")
        audit = state.get("audit") or {}
        void_offsets = [r["offset_s"] for r in bio.records
                        if r.get("certificate") == "void" and r.get("offset_s") is not None]
        rows.append({
            "run": bio.name, "policy": run_policy(bio),
            "latency_reduction_pct": c["latency_reduction_pct"],
            "latency_reduction_bounds95_pct": c["latency_reduction_bounds95_pct"],
            "accuracy_loss_pp": loss, "accuracy_loss_bounds95_pp": c.get("accuracy_loss_bounds95_pp"),
            "admission_rate": c["admission_rate"], "rejection_rate": c["rejection_rate"],
            "shed": shed, "shed_rate": shed / len(bio.records) if bio.records else None,
            "budget_pp": budget_pp, "certified": certificate.get("certified"),
            "smallest_certifiable_budget_pp": certificate.get("smallest_certifiable_budget_pp"),
            "accuracy_spent_pp": spent,
            "accuracy_spent_bounds95_pp": None if spent_all is None else spent_all["accuracy_loss_bounds95_pp"],
            "refused_scored_wrong": None if spent_all is None else spent_all["rejected_scored_wrong"],
            "accuracy_spent_answered_pp": None if answered is None else answered["accuracy_loss_pp"],
            # Decided on the bounds: held when the upper bound of the spent accuracy is within budget.
            "budget_status": None if budget_pp is None or spent is None else
            decide_at_most(spent_all["accuracy_loss_bounds95_pp"], budget_pp, CLAIM_TOLERANCE),
            "slo_p95_ms": slo.get("slo_p95_ms"), "p95_ms": bio_p95,
            "held_slo": None if not slo.get("slo_p95_ms") or bio_p95 is None else bio_p95 <= slo["slo_p95_ms"],
            "slo_unreachable_periods": slo.get("unreachable"), "slo_violated_periods": slo.get("violations"),
            "service_p95_ms": slo.get("service_p95_ms"),
            "condition_differences": c["condition_differences"],
            # The live audit (targets.control.audit): whether the certificate still applied, and from when not.
            "audited": audit.get("audited"), "audit_disagreement": audit.get("disagreement"),
            "audit_reference": audit.get("reference"),
            "certificate_state": budget.get("certificate_state"),
            "certificate_void_at_s": min(void_offsets) if void_offsets else None,
            "certificate_void_reason": budget.get("void_reason"),
            "certificate_void_after_audited": audit.get("void_after_audited"),
            "drift": _drift_harms(standard, bio),
        })
    return rows


def _drift_harms(standard: Run, bio: Run) -> dict | None:
    """A run with a planted drift: bio's drifted requests paired with standard's answers to the
    same requests (the full model on the same input), split at the live audit's void: rows, rows
    harmed (standard right, bio wrong) and fixed, in each part. None without drifted requests."""
    answers = {r["seq"]: r for r in standard.records if r.get("drifted") and outcome(r) == ANSWERED}
    paired = [(r, answers[r["seq"]]) for r in bio.records
              if r.get("drifted") and outcome(r) == ANSWERED and r.get("seq") in answers]
    if not paired:
        return None
    parts = {}
    for name, void in (("certificate_held", False), ("after_void", True)):
        part = [(b, s) for b, s in paired if (b.get("certificate") == "void") == void]
        parts[name] = {"rows": len(part), "harmed": sum(s["correct"] and not b["correct"] for b, s in part),
                       "fixed": sum(b["correct"] and not s["correct"] for b, s in part)}
    return parts


def compare_pair(standard: Run, bio: Run) -> dict:
    """Standard vs one bio run: latency, paired accuracy, energy, warm-up excluded from both."""
    warm_s, warm_rule = warmup_s(bio)
    std_measured = _measured(standard, warm_s)
    bio_measured = _measured(bio, warm_s)
    std_lat = np.array([r["latency_ms"] for r in _answered(std_measured)])
    bio_lat = np.array([r["latency_ms"] for r in _answered(bio_measured)])
    std_fig, bio_fig = request_figures(std_measured), request_figures(bio_measured)
    std_energy, bio_energy = _energy(standard, len(_answered(standard.records))), _energy(bio, len(_answered(bio.records)))

    def mean_reduction(a, b):
        return reduction_pct(float(a.mean()), float(b.mean()))

    open_loop = bool(standard.metadata.get("open_loop")) and bool(bio.metadata.get("open_loop"))
    latency = _paired_latency(std_measured, bio_measured) if open_loop else None
    if latency is None and std_lat.size and bio_lat.size:  # closed loop: two request sets, unpaired
        latency = {"latency_reduction_pct": mean_reduction(std_lat, bio_lat), "n_pairs": 0,
                   "latency_reduction_bounds95_pct": list(independent_bootstrap_ci(std_lat, bio_lat, mean_reduction,
                                                                                 level=1 - 2 * ALPHA)),
                   "latency_bound_method": "unpaired bootstrap (closed loop: no request pairs)"}
    latency = latency or {"latency_reduction_pct": None, "latency_reduction_bounds95_pct": None, "n_pairs": 0,
                          "latency_bound_method": None}
    comparison = {
        "standard_run": standard.name,
        "bio_run": bio.name,
        "open_loop": open_loop,
        "condition_differences": condition_differences(standard, bio),
        "warmup_s": None if warm_s == float("inf") else warm_s,
        "warmup_rule": warm_rule,
        "warmup_excluded": {"standard": len(standard.records) - len(std_measured),
                            "bio": len(bio.records) - len(bio_measured)},
        "n_standard": len(std_lat),
        "n_bio": len(bio_lat),
        **latency,
        "n_replicates": 1,
        "run_to_run_included": False,
        "p95_reduction_pct": reduction_pct(std_fig["p95_ms"], bio_fig["p95_ms"])
        if std_fig["p95_ms"] and bio_fig["p95_ms"] is not None else None,
        "admission_rate": bio_fig["admission_rate"],
        "rejection_rate": bio_fig["rejected"] / (bio_fig["answered"] + bio_fig["rejected"])
        if bio_fig["answered"] + bio_fig["rejected"] else None,
        "energy_source": "+".join(sorted({std_energy["energy_source"], bio_energy["energy_source"]})),
        "energy_reduction_pct": reduction_pct(std_energy["energy_per_request_j"], bio_energy["energy_per_request_j"])
        if std_energy["energy_per_request_j"] and bio_energy["energy_per_request_j"] is not None else None,
        "energy_includes_load_generator": bio_energy["energy_includes_load_generator"],
        "gateway_energy_fed": (bio.metadata.get("controller_state_at_end") or {}).get("energy_source"),
    }
    reference = bio.reference or standard.reference
    paired = _paired_accuracy(bio_measured, reference, standard.records) if reference is not None else None
    if paired is not None:
        comparison.update(paired)
        comparison["standard_matches_reference"] = _reference_agreement(std_measured, reference)
    else:  # runs recorded without reference answers: unpaired, and said so
        std_ok = np.array([bool(r["correct"]) for r in std_measured if outcome(r) in (ANSWERED, REJECTED)], float)
        bio_ok = np.array([bool(r["correct"]) for r in bio_measured if outcome(r) in (ANSWERED, REJECTED)], float)
        if std_ok.size and bio_ok.size:
            def loss_pp(a, b):
                return 100 * (float(a.mean()) - float(b.mean()))

            comparison.update(accuracy_loss_pp=loss_pp(std_ok, bio_ok), accuracy_paired=False,
                              accuracy_loss_bounds95_pp=list(independent_bootstrap_ci(std_ok, bio_ok, loss_pp,
                                                                                      level=1 - 2 * ALPHA)))
        else:
            comparison.update(accuracy_loss_pp=None, accuracy_loss_bounds95_pp=None, accuracy_paired=False)
    return comparison


def _paired_latency(std_measured: list[dict], bio_measured: list[dict]) -> dict | None:
    """Open loop: the latency reduction over the requests both runs answered, paired by their
    place in the schedule (``seq``), with one-sided 95 % bounds from a bootstrap over whole
    seconds of the schedule (a queue carries delay from one request to the next). None when no
    request pairs."""
    standard = {r["seq"]: r for r in _answered(std_measured) if r.get("seq") is not None}
    pairs = [(standard[r["seq"]], r) for r in _answered(bio_measured) if r.get("seq") in standard]
    if not pairs:
        return None
    std_ms = np.array([s["latency_ms"] for s, _ in pairs])
    bio_ms = np.array([b["latency_ms"] for _, b in pairs])
    blocks = np.array([int((s.get("offset_s") or 0.0) // PAIRING_BLOCK_S) for s, _ in pairs])
    return {"latency_reduction_pct": reduction_pct(float(std_ms.mean()), float(bio_ms.mean())),
            "latency_reduction_bounds95_pct": list(ratio_reduction_bounds(std_ms, bio_ms, blocks)),
            "n_pairs": len(pairs),
            "latency_bound_method": f"paired by request, bootstrap over {len(np.unique(blocks))} "
                                    f"blocks of {PAIRING_BLOCK_S:g} s of the schedule (one replicate: "
                                    "run-to-run variation not included)"}


def _claim(name, target, measured, ci, n, status, reason=None, gated=True) -> dict:
    claim = {"name": name, "target": target, "measured": measured, "bounds95": ci, "n": n, "status": status,
             "gated": gated}
    if reason:
        claim["reason"] = reason
    return claim


def claims(comparison: dict | None) -> list[dict]:
    """The paper's claims under load, each held, not held or not measurable (with the reason),
    with the numbers it rests on; and the energy claim (bio spends less energy per answered
    request), which an estimate cannot decide."""
    latency_target = f">= {PAPER_LATENCY_REDUCTION_PCT:g} %"
    accuracy_target = f"<= {PAPER_ACCURACY_LOSS_PP:g} pp (paired, rejections wrong)"
    energy_target = "> 0 % (energy per answered request)"
    if comparison is None:
        reason = "needs one standard and one bio run"
        return [_claim("latency_reduction", latency_target, None, None, None, NOT_MEASURABLE, reason),
                _claim("accuracy_loss", accuracy_target, None, None, None, NOT_MEASURABLE, reason),
                _claim("energy_reduction", energy_target, None, None, None, NOT_MEASURABLE, reason, gated=False)]
    c = comparison
    blocked = None
    if c["condition_differences"]:
        blocked = "the runs differ in " + "; ".join(c["condition_differences"])
    elif not c["open_loop"]:
        blocked = "unequal offered load: closed loop gives the faster mode more requests"
    elif c["warmup_s"] is None:
        blocked = "τ(t) never settled: every request is warm-up"
    n = [c["n_standard"], c["n_bio"]]

    def decide(measured, status_of):
        if blocked:
            return NOT_MEASURABLE, blocked
        if measured is None:
            return NOT_MEASURABLE, "no answered requests after the warm-up"
        return status_of(measured), None

    latency = c["latency_reduction_pct"]
    loss = c["accuracy_loss_pp"]
    latency_bounds, loss_bounds = c["latency_reduction_bounds95_pct"], c.get("accuracy_loss_bounds95_pp")
    # Latency and accuracy are decided on their bounds, never on the point.
    status_l, reason_l = decide(latency, lambda _: decide_at_least(latency_bounds, PAPER_LATENCY_REDUCTION_PCT,
                                                                   CLAIM_TOLERANCE))
    if status_l != NOT_MEASURABLE:
        reason_l = _latency_reason(c, status_l)
    status_a, reason_a = decide(loss, lambda _: decide_at_most(loss_bounds, PAPER_ACCURACY_LOSS_PP, CLAIM_TOLERANCE))
    if status_a == INCONCLUSIVE and c.get("accuracy_loss_detail"):
        detail = c["accuracy_loss_detail"]
        reason_a = undecided_text({"rows_to_decide": rows_to_decide_loss(detail, PAPER_ACCURACY_LOSS_PP),
                                   "n_rows": detail["n_rows"]})
    if not blocked and loss is not None and not c.get("accuracy_paired"):
        reason_a = "unpaired (the runs carry no reference answers)"
    energy = c["energy_reduction_pct"]
    if energy is not None and not is_estimate(c["energy_source"]):
        # No interval: a point, stated as such.
        status_e, reason_e = decide(energy, lambda v: HELD if v > CLAIM_TOLERANCE else NOT_HELD)
        if c.get("energy_includes_load_generator"):
            reason_e = (reason_e + "; " if reason_e else "") + "includes the load generator's own energy"
    else:
        status_e = NOT_MEASURABLE
        reason_e = ("no energy source read" if energy is None else
                    f"{c['energy_source']} is an estimate from time and utilisation: its 'saving' is the "
                    "throughput ratio, not a measurement")
    return [
        _claim("latency_reduction", latency_target, latency, latency_bounds, n, status_l, reason_l),
        _claim("accuracy_loss", accuracy_target, loss, loss_bounds, n, status_a, reason_a),
        _claim("energy_reduction", energy_target, energy, None, n, status_e, reason_e,
               gated=status_e != NOT_MEASURABLE or bool(blocked)),
    ]


def _latency_reason(c: dict, status: str) -> str | None:
    """What the latency claim's decision rests on beyond its bounds: run-to-run variation left out
    (one replicate), and, when inconclusive, about how many replicates would decide it."""
    notes = []
    if not c.get("run_to_run_included"):
        notes.append("one replicate: run-to-run variation is not in the bounds (validate --repeats 3 puts it in)")
    if status == INCONCLUSIVE and c["latency_reduction_bounds95_pct"] is not None:
        replicates = n_to_decide_at_least(c["latency_reduction_pct"], c["latency_reduction_bounds95_pct"],
                                          PAPER_LATENCY_REDUCTION_PCT, c.get("n_replicates") or 1)
        notes.append("no feasible number of replicates decides it" if replicates is None else
                     f"about {max(replicates, 2)} replicates (--repeats) would decide it")
    return "; ".join(notes) or None


def _stability_cv(records: list[dict], seconds: int) -> float | None:
    """Coefficient of variation of answered requests per second over the last whole seconds."""
    answered = [r.get("t_sent") or r["t_intended"] for r in _answered(records)]
    if not answered:
        return None
    start = min(answered)
    last_whole = int(max(answered) - start)  # the final, partial second is left out
    if last_whole < seconds:
        return None
    counts = np.bincount(np.floor(np.array(answered) - start).astype(int), minlength=last_whole + 1)
    tail = counts[last_whole - seconds : last_whole].astype(float)
    return float(tail.std() / tail.mean()) if tail.mean() > 0 else None


def _kept_up(records: list[dict], seconds: int) -> float | None:
    """Open loop: requests completed (answered or rejected) over requests that arrived in the last
    whole seconds of the schedule; 1.0 when the server keeps up, below when a queue grows.
    (The throughput CV of the closed-loop rule would judge Poisson noise, not the server.)"""
    timed = [r for r in records if r.get("t_intended") is not None]
    if not timed:
        return None
    start = min(r["t_intended"] for r in timed)
    last_whole = int(max(r["t_intended"] for r in timed) - start)
    if last_whole < seconds:
        return None
    lo, hi = start + last_whole - seconds, start + last_whole
    arrived = sum(lo <= r["t_intended"] < hi for r in timed)
    done = [r["t_intended"] + (r["latency_ms"] or 0.0) / 1e3 for r in timed
            if outcome(r) in (ANSWERED, REJECTED)]
    completed = sum(lo <= t < hi for t in done)
    return completed / arrived if arrived else None


def _stability_reason(run: Run, rules: ValidityRules) -> str | None:
    if run.metadata.get("open_loop"):
        kept = _kept_up(run.records, rules.stability_windows)
        if kept is None:
            return f"{run.name}: too short to judge the stability of its last {rules.stability_windows} seconds"
        if abs(kept - 1.0) > rules.max_stability_cv:
            return (f"{run.name}: completed {100 * kept:.0f} % as many requests as arrived in its last "
                    f"{rules.stability_windows} s (allowed {100 * (1 - rules.max_stability_cv):g}–"
                    f"{100 * (1 + rules.max_stability_cv):g} %): not a steady state (a queue grows or drains)")
        return None
    cv = _stability_cv(run.records, rules.stability_windows)
    if cv is None:
        return f"{run.name}: too short to judge the stability of its last {rules.stability_windows} seconds"
    if cv > rules.max_stability_cv:
        return (f"{run.name}: throughput of the last {rules.stability_windows} s varies by "
                f"{100 * cv:.0f} % (max {100 * rules.max_stability_cv:g} %): not stable")
    return None


def _replay_reasons(run: Run, rules: ValidityRules) -> list[str]:
    """Open loop: every arrival of the schedule sent at most once; in a distributed run, every
    worker replayed the run's schedule and none fell behind (its own late share)."""
    if not run.metadata.get("open_loop"):
        return []
    reasons = []
    seqs = [r.get("seq") for r in run.records if r.get("seq") is not None]
    repeated = len(seqs) - len(set(seqs))
    if repeated:
        reasons.append(f"{run.name}: {repeated} arrival(s) of the schedule sent more than once (the workers' "
                       f"shares overlap)")
    digest = (run.metadata.get("schedule") or {}).get("digest")
    for w in run.metadata.get("workers") or []:
        name = f"{run.name}: worker {w.get('worker_index', '?')} ({w.get('source')})"
        if w.get("schedule_digest") is None:
            reasons.append(f"{name} sent requests but never said which schedule it replayed")
        elif w["schedule_digest"] != digest:
            reasons.append(f"{name} replayed schedule {w['schedule_digest'][:12]}, not the run's {str(digest)[:12]}")
        if w["sent"] and w["late"] / w["sent"] > rules.max_late_fraction:
            reasons.append(f"{name} fell behind: {w['late']} of its {w['sent']} sends on the wire late "
                           f"({100 * w['late'] / w['sent']:.1f} % > {100 * rules.max_late_fraction:g} %)")
    return reasons


def validity(runs: list[Run], figures: list[dict], rules: ValidityRules = ValidityRules(),
             comparison: dict | None = None) -> list[str]:
    """Why the report is INVALID (empty: VALID)."""
    reasons = []
    if not runs:
        return ["no runs"]
    for run, f in zip(runs, figures):
        if not f["finished"]:
            reasons.append(f"{run.name}: the run did not finish (interrupted or crashed): a partial report")
        if f["duration_s"] < rules.min_duration_s:
            reasons.append(f"{run.name}: ran {f['duration_s']:.1f} s, below the minimum {rules.min_duration_s:g} s")
        if f["answered"] < rules.min_requests:
            reasons.append(f"{run.name}: {f['answered']} answered requests, below the minimum {rules.min_requests}")
        if f["n"] and f["late"] / f["n"] > rules.max_late_fraction:
            reasons.append(f"{run.name}: {f['late']} of {f['n']} open-loop sends on the wire late "
                           f"({100 * f['late'] / f['n']:.1f} % > {100 * rules.max_late_fraction:g} %)")
        if f["n"] and f["failed"] / f["n"] > rules.max_failure_fraction:
            top = ", ".join(f"{reason} ×{n}" for reason, n in
                            sorted(f["failure_reasons"].items(), key=lambda kv: -kv[1])[:3])
            reasons.append(f"{run.name}: {f['failed']} of {f['n']} requests failed "
                           f"({100 * f['failed'] / f['n']:.2f} % > {100 * rules.max_failure_fraction:g} %): {top}")
        if f["achieved_fraction"] is not None and f["achieved_fraction"] < rules.min_achieved_fraction:
            s = f["schedule"]
            reasons.append(f"{run.name}: achieved {f['achieved_rps']:.1f} requests/s of the {s['requested_rps']:.1f} "
                           f"requested ({f['sent']} of {s['n_scheduled']} scheduled sent, "
                           f"{100 * f['achieved_fraction']:.1f} % < {100 * rules.min_achieved_fraction:g} %)")
        stability = _stability_reason(run, rules)
        if stability:
            reasons.append(stability)
        reasons += _replay_reasons(run, rules)
    if comparison is not None:
        for difference in comparison["condition_differences"]:
            reasons.append(f"standard and bio ran under different conditions: {difference}")
        if comparison["warmup_s"] is None:
            reasons.append(f"{comparison['bio_run']}: {comparison['warmup_rule']}")
    return reasons


def regressions(summary: dict, baseline: dict, tolerances: Tolerances = Tolerances()) -> list[str]:
    """Figures that got worse than ``baseline`` (a previous summary.json) beyond the tolerances."""
    found = []
    now, then = summary.get("comparison") or {}, baseline.get("comparison") or {}
    checks = [("latency_reduction_pct", tolerances.latency_reduction_pp, -1),
              ("energy_reduction_pct", tolerances.energy_reduction_pp, -1),
              ("accuracy_loss_pp", tolerances.accuracy_loss_pp, +1)]
    for key, tolerance, worse_sign in checks:
        if now.get(key) is None or then.get(key) is None:
            continue
        change = now[key] - then[key]
        if change * worse_sign > tolerance:
            found.append(f"{key} regressed: {then[key]:.2f} -> {now[key]:.2f} (tolerance {tolerance:g})")
    return found


def ablation_claims(ablation: dict | None) -> list[dict]:
    """The in-process ablation's claims in the report's form (held / not_held / inconclusive, on
    their bounds). An ablation recorded before three-way verdicts keeps its held / not held."""
    if not ablation:
        return []
    n = (ablation.get("standard") or {}).get("n_requests")
    claims_ = [{**c, "bounds95": c.get("bounds95"), "n": [n, n] if n else None,
                "status": c.get("status") or (HELD if c.get("passed") else NOT_HELD)}
               for c in ablation.get("claims", [])]
    for c in claims_:
        if c["status"] == INCONCLUSIVE and undecided_text(c):
            c["reason"] = undecided_text(c)
    return claims_


def _promise_text(row: dict) -> str:
    """A budget-policy run's own promises: the accuracy it spent against its budget, and its p95
    against its SLO with the share shed (e.g. ``bio (budget): budget held (spent 0.00 <= 0.5 pp),
    SLO not held (p95 6.4 > 1 ms, 81.7 % shed)``)."""
    spent = row["accuracy_spent_pp"]
    lo, hi = row["accuracy_spent_bounds95_pp"]
    refused = row.get("refused_scored_wrong")
    refusals = (f"; {refused} shed or rejected, counted as lost" + (
        "" if row.get("accuracy_spent_answered_pp") is None else
        f"; answers alone {row['accuracy_spent_answered_pp']:.2f} pp") if refused else "")
    words = [f"budget {STATUS_WORDS[row['budget_status']]} (spent {spent:.2f} pp, one-sided 95 % bounds "
             f"{lo:.2f} … {hi:.2f}, against {row['budget_pp']:g} pp{refusals})"]
    if row.get("held_slo") is not None:
        shed = "" if not row.get("shed_rate") else f", {100 * row['shed_rate']:.1f} % shed"
        if not row["held_slo"] and row.get("slo_unreachable_periods"):
            service = row.get("service_p95_ms")
            periods = row["slo_unreachable_periods"]
            of = f" in {periods} of {row['slo_violated_periods']} violated periods" if row.get("slo_violated_periods") else ""
            shed += (", out of reach of shedding: the gateway's service time alone"
                     + ("" if service is None else f" (p95 {service:.2f} ms at the end)") + f" broke it{of}")
        words.append(f"SLO {'held' if row['held_slo'] else 'not held'} (p95 {row['p95_ms']:.1f} "
                     f"{'<=' if row['held_slo'] else '>'} {row['slo_p95_ms']:g} ms{shed})")
    if row.get("certificate_state") == "void":
        at = row.get("certificate_void_at_s")
        words.insert(0, "guarantee BROKEN: the live audit voided the certificate"
                     + ("" if at is None else f" at t = {at:.1f} s of the schedule")
                     + ("" if row.get("certificate_void_after_audited") is None else
                        f" after {row['certificate_void_after_audited']} audited rows")
                     + f" ({row.get('certificate_void_reason')}); from then on every request ran the full model"
                     + _drift_text(row.get("drift")))
    elif row.get("audited"):
        words.append(f"certificate held under the live audit ({row['audited']} rows audited, disagreement "
                     f"{100 * (row.get('audit_disagreement') or 0):.2f} % vs {100 * (row.get('audit_reference') or 0):.2f} % "
                     "on validation)")
    return f"{row['run']} ({row['policy']}): " + ", ".join(words)


def _drift_text(drift: dict | None) -> str:
    if not drift:
        return ""
    def part(p):
        return "no rows" if not p["rows"] else f"{100 * p['harmed'] / p['rows']:.2f} % of {p['rows']}"
    return (f"; drifted rows harmed against the full model on the same request: {part(drift['certificate_held'])} "
            f"before the void, {part(drift['after_void'])} after it")


def verdict_line(summary: dict) -> str:
    """One line: what held, what did not, and what VALID/INVALID refers to."""
    parts = {HELD: [], NOT_HELD: [], INCONCLUSIVE: [], NOT_MEASURABLE: []}
    for c in summary.get("ablation_claims", []):
        parts[c["status"]].append(f"in-process {c['name']}")
    for c in summary["claims"]:
        parts[c["status"]].append(f"under load {c['name']}")
    text = [f"{STATUS_WORDS[status]}: {', '.join(names)}" for status, names in parts.items() if names]
    text.extend(_promise_text(row) for row in summary.get("policies", []) if row.get("budget_status") is not None)
    replicates = (summary.get("comparison") or {}).get("n_replicates")
    if replicates:
        text.append(f"decided on one-sided 95 % bounds; load stage {replicates} replicate"
                    + ("s (run-to-run variation in the latency bound)" if replicates > 1 else
                       " (run-to-run variation not in the latency bound)"))
    if summary["valid"]:
        validity_text = ("load test VALID (VALID refers to the load test's measurement: same conditions, "
                         "the offered load achieved, failures <= 0.1 %, sends on time)")
    else:
        validity_text = (f"load test INVALID ({len(summary['invalid_reasons'])} measurement rule(s) broken, "
                         "listed above: its claims decide nothing)")
    if not summary["valid"]:  # an invalid run leads with it: its claims decide nothing
        return "verdict: " + " · ".join([validity_text, *text])
    return "verdict: " + " · ".join([*text, validity_text])


def build_summary(runs: list[Run], baseline: dict | None = None, rules: ValidityRules = ValidityRules(),
                  tolerances: Tolerances = Tolerances(), ablation: dict | None = None) -> dict:
    figures = [run_figures(r) for r in runs]
    comparison = compare(runs)
    reasons = validity(runs, figures, rules, comparison)
    summary = {
        "valid": not reasons,
        "invalid_reasons": reasons,
        "claims": claims(comparison),
        "comparison": comparison,
        "runs": {f["name"]: f for f in figures},
        "validity_rules": vars(rules),
    }
    policies = policy_comparisons(runs)
    if len(policies) > 1 or any(row["policy"] != "paper" for row in policies):
        summary["policies"] = policies
    if ablation is not None:
        summary["ablation"] = ablation
        summary["ablation_claims"] = ablation_claims(ablation)
    if baseline is not None:
        summary["regressions"] = regressions(summary, baseline, tolerances)
    summary["verdict"] = verdict_line(summary)
    return summary
