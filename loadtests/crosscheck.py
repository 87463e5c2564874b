"""Cross-check the load generator: Locust (this project's locustfile) against wrk, same gateway.

    python -m loadtests.crosscheck --model digits --users 16 --seconds 15 [--scenario bio]

Starts one gateway (the scenario's controller; for bio at its steady τ with γ = β = 0, so that
both generators meet the same controller) and drives it closed loop with ``--users``
connections, first with wrk, then with the locustfile (``--shape steady``, records on disk), each
for ``--seconds`` on the load generator's CPUs (the gateway on the others, where there are two or
more). Prints each one's achieved rate and p50 and Locust's over wrk's; Locust's figures come from
its own records (answered requests after the first fifth of the run, a warm-up). Both should
agree within 10 % when the load generator is not the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.capacity import infer_bodies
from loadtests.gateway_process import GatewayProcess
from loadtests.runner import locustfile
from loadtests.wrk import run_wrk
from targets.cpus import cpu_list, pin_to, split_for_load_test


def locust_figures(records_path: Path, warmup_fraction: float = 0.2) -> dict:
    """Achieved rate and p50 from a run's ``requests.jsonl``: answered requests sent after the
    warm-up, over the span of their send times."""
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    sent = sorted(r["t_sent"] for r in records if r.get("t_sent") is not None)
    if len(sent) < 10:
        raise RuntimeError(f"Locust recorded only {len(sent)} requests")
    start = sent[0] + (sent[-1] - sent[0]) * warmup_fraction
    kept = [r for r in records if r.get("t_sent") is not None and r["t_sent"] >= start]
    answered = [r for r in kept if r.get("status") == 200]
    span = max(r["t_sent"] for r in kept) - start
    return {"requests_per_s": len(answered) / span if span > 0 else 0.0,
            "p50_ms": statistics.median(r["latency_ms"] for r in answered), "requests": len(answered),
            "failed": len(kept) - len(answered)}


def run_locust(url: str, model: str, scenario: str, users: int, seconds: int, cpus, results: Path) -> dict:
    command = [sys.executable, "-m", "locust", "-f", str(locustfile(scenario)), "--headless",
               "--shape", "steady", "--base-users", str(users), "--phase-s", f"{seconds / 6:g}",
               "-t", f"{seconds}s", "--model", model, "--energy", "off", "--results", str(results),
               "--host", url]
    with (results.parent / "locust.log").open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120,
                       preexec_fn=pin_to(cpus) if cpus else None)
    return locust_figures(results / "requests.jsonl")


def crosscheck(model: str, scenario: str, users: int, seconds: int) -> dict:
    from targets.model.registry import resolve_model

    spec = resolve_model(model)
    split = split_for_load_test()
    generator, server = split if split else (None, None)
    # bio: τ at its steady value from the start and no congestion or energy term, so that both
    # generators meet the same controller (τ(t) decays and ĉ follows the load otherwise)
    controller = (["--controller", "bio", "--policy", "paper", "--k", "1e6", "--gamma", "0", "--beta", "0"]
                  if scenario == "bio" else ["--controller", "off"])
    with GatewayProcess("--model", model, *controller, cpus=server) as gateway, \
            tempfile.TemporaryDirectory(prefix="green-mlops-crosscheck-") as tmp:
        bodies = infer_bodies(spec.load_eval()[0], spec.input_name, n=1 << 30)  # every held-out row
        wrk = run_wrk(gateway.url, f"/v2/models/{spec.name}/infer", bodies, connections=users,
                      duration_s=seconds, cpus=generator)
        locust = run_locust(gateway.url, model, scenario, users, seconds, generator, Path(tmp) / "run")
    return {"model": model, "scenario": scenario, "users": users, "seconds": seconds,
            "cpus": {"load_generator": cpu_list(generator), "gateway": cpu_list(server)} if split else "shared",
            "wrk": wrk, "locust": locust,
            "rate_ratio": locust["requests_per_s"] / wrk["requests_per_s"],
            "p50_ratio": locust["p50_ms"] / wrk["p50_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.crosscheck", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--scenario", choices=("standard", "bio"), default="standard")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args(argv)
    if args.users < 1 or args.seconds < 5:
        parser.error("--users must be >= 1 and --seconds >= 5")
    r = crosscheck(args.model, args.scenario, args.users, args.seconds)
    print(f"model {r['model']} · {r['scenario']} · {r['users']} connections · {r['seconds']} s each · CPUs {r['cpus']}")
    print(f"| generator | requests/s | p50 ms |\n|---|---:|---:|")
    print(f"| wrk | {r['wrk']['requests_per_s']:.0f} | {r['wrk']['p50_ms']:.2f} |")
    print(f"| Locust | {r['locust']['requests_per_s']:.0f} | {r['locust']['p50_ms']:.2f} |")
    print(f"Locust / wrk: rate {r['rate_ratio']:.3f}, p50 {r['p50_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
