"""`green-mlops validate`, the main job: the paper's ablation and its verdict.

1. In-process, paired ablation on the held-out set (standard vs bio on the same requests,
   batch 1, energy windows per block): the figures of the JSON document.
2. Unless ``--no-load``: the standard and bio locustfiles, each against its own gateway, under a
   congestion pattern, profilers on. By default open loop: one seeded schedule of arrival times
   and rows (``schedule.json``) is generated here, once, and replayed identically by both, so
   both see the same offered load (``--load-arrival-rate 0``: closed loop, no claim decided).
3. The report over the whole job: the in-process ablation and the two load runs, each with its
   claims (``report.html``, ``report.md``, ``summary.json``), ending with one verdict line.

Everything lands in ``--results`` (default ``results/<UTC>-validate/``): ``validate.json``,
``ablation/`` (``ablation.json``, energy windows, timeline), ``schedule.json``, ``standard/``,
``bio/`` and the report. ``validate.json`` and ``ablation/ablation.json`` are written as soon
as the ablation ends, so a Ctrl-C during the load stage loses neither (exit 130).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from reports.console import wide_console
from green_mlops.run_setup import (EXIT_GATE, EXIT_INTERRUPTED, make_default_controller, make_results_dir,
                                   open_energy, stderr, tau_inf_is_explicit)
from green_mlops.models import resolve_model
from loadtests.ablation import ladder_figures, ladder_lines, request_order, run_ablation, run_sweep, sweep_taus
from loadtests.capacity import (AUTO_RATE, CEILING_RPS, DEFAULT_PHASE_S, DEFAULT_RUN_S, PEAK_UTILISATION,
                                ProbeError, Sizing, duration_stretch, infer_bodies,
                                probe_round_trips, size_arrival_rate)
from loadtests.runner import LoadSpec, run_scenario
from loadtests.schedule import SCHEDULE_FILE, ScheduleError, make_schedule
from loadtests.shapes import Shape, ShapeParams
from profilers.profiler import Sampler
from reports.ablation import print_summary, print_sweep, summarise
from reports.bounds import STATUS_WORDS
from reports.build import build_report, gate_failures
from reports.tracking import log_validate, require_mlflow
from reports.runs import ABLATION_FILE, OFFERED_LOAD_FILE
from targets.control.calibration import check_ladder, rule_line, rule_record
from targets.errors import GreenMLOpsError
from targets.backends.ort_target import OnnxRuntimeTarget


def _toml(config: dict) -> str:
    lines = ["[controller]"]
    for key, value in config.items():
        if value is None:
            continue  # TOML has no null: an unset optional setting is left out
        value = list(value) if isinstance(value, tuple) else value
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, document: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    except OSError as exc:
        raise GreenMLOpsError(f"cannot write {path}: {exc}") from exc




def budget_lines(budget: dict) -> list[str]:
    """The budget policy's certificate, in words."""
    cert = budget["certificate"]
    path = ("per-exit thresholds, screened on {} validation rows and tested on {}".format(cert["n_screen"], cert["n_test"])
            if cert["path"] == "per-exit" else f"one threshold shared by every exit, tested on {cert['n_test']} rows")
    loss = "rows harmed" if cert["loss"] == "harm" else "rows harmed minus rows fixed (the accuracy gap)"
    ceiling = ", ".join(f"{t:.3f}" for t in cert["ceiling_thresholds"])
    return [f"budget policy: accuracy loss ≤ {cert['budget_pp']:g} pp against the full model with probability "
            f"≥ {1 - cert['risk_delta']:g}, for every point of the certified path up to its ceiling "
            f"(Learn-then-Test, fixed sequence; {path}; risk: {loss}; the smallest budget the test rows can "
            f"certify is {cert['smallest_certifiable_budget_pp']:.2f} pp)",
            f"certified ceiling: point {cert['ceiling_index']} of {cert['path_points']}, exit thresholds u < ({ceiling}); "
            f"on the test rows {100 * cert['exit_rate']:.1f} % leave early, depth histogram {cert['depth_histogram']}; "
            f"spend {budget['spend']}"]


def run_validate(args) -> int:
    if args.backend == "triton" and args.compare_policies and not args.no_load:
        raise GreenMLOpsError("--compare-policies runs through the gateway only: drop it, or --backend triton")
    if args.repeats > 1 and args.load_arrival_rate != AUTO_RATE and args.load_arrival_rate <= 0 and not args.no_load:
        raise GreenMLOpsError("--repeats > 1 needs open loop (--load-arrival-rate > 0): replicates are paired by "
                              "their schedule, and a closed-loop run has none (add --repeats 1)")
    # Run and phase lengths: given, or the defaults, which an auto rate may stretch (loadtests.capacity).
    stretch_durations = args.load_s is None and args.load_phase_s is None
    args.load_s = DEFAULT_RUN_S if args.load_s is None else args.load_s
    args.load_phase_s = DEFAULT_PHASE_S if args.load_phase_s is None else args.load_phase_s
    if args.mlflow:
        require_mlflow()  # before the run: a missing extra must not cost a whole validation
    spec = resolve_model(args.model)
    backend = OnnxRuntimeTarget(spec, device=args.device)
    ladder = check_ladder(spec, backend)  # a stage from another build: one line, exit 2, before any work
    controller = make_default_controller(args, spec, backend)  # certifies here, before any work
    config = controller.config
    x, y = spec.load_eval()
    x_validation = spec.load_validation()[0] if args.sweep else None  # sweep points come from it: fail early
    order = request_order(len(x), args.requests, min_requests=2000)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = make_results_dir(args.results or Path(f"results/{stamp}-validate"))
    profiler = open_energy(args, make_results_dir(results / "ablation"))
    console = wide_console()
    console.print(f"model {spec.name} · provider {backend.provider} · {len(order)} requests "
                  f"per mode over {len(x)} held-out inputs · τ∞ {config.tau_inf:.4f} · policy {config.policy} · "
                  f"energy {', '.join(profiler.source_labels()) if profiler and profiler.sources else 'off'}",
                  highlight=False, markup=False)
    if ladder is not None:
        console.print(f"ladder check: chained stages equal full.onnx on {ladder['rows']} validation rows "
                      f"(largest probability difference {ladder['max_abs_diff']:.1e})", highlight=False, markup=False)
    sampler = None
    if profiler is not None:
        sampler = Sampler(profiler, rate_hz=10.0, path=results / "ablation" / "timeline.jsonl")
        sampler.start()
    try:
        with Progress(console=stderr, transient=True) as progress:
            task = progress.add_task("ablation: standard ⇄ bio", total=len(order))
            result = run_ablation(backend, config, x, y, order, warmup_requests=args.warmup,
                                  progress=lambda done: progress.update(task, completed=done),
                                  profiler=profiler, controller=controller)
    finally:
        if sampler is not None:
            sampler.stop()
        if profiler is not None:
            profiler.close()
    summary = summarise(result, backend.provider, spec.name, asdict(config))
    summary["calibration_rule"] = rule_record(spec, config, tau_inf_is_explicit(args))  # rule, version, split
    print_summary(summary, console)
    console.print(rule_line(summary["calibration_rule"]), highlight=False, markup=False, soft_wrap=True)
    if controller.budget is not None:
        summary["budget"] = controller.budget.state()
        for line in budget_lines(summary["budget"]):
            console.print(line, highlight=False, markup=False)
    summary["ladder"] = ladder_figures(result, _calibration(spec, config, args, backend))
    for line in ladder_lines(summary["ladder"]):
        console.print(line, highlight=False, markup=False)

    if args.sweep:
        # Points chosen on the validation split; measured on held-out, interleaved with standard.
        taus = sweep_taus(backend, x_validation, config, args.sweep_points)
        sweep_order = order[: len(x)]
        with Progress(console=stderr, transient=True) as progress:
            task = progress.add_task("τ∞ sweep ⇄ standard", total=len(sweep_order))
            summary["sweep"] = run_sweep(backend, config, taus, x, y, sweep_order,
                                         progress=lambda n: progress.update(task, completed=n))
        print_sweep(summary["sweep"], summary["standard"], console)

    _write_json(results / "ablation" / ABLATION_FILE, summary)
    _write_json(results / "validate.json", summary)  # the ablation survives whatever comes next

    failures = [f"claim {c['name']} {c['status'].replace('_', ' ')} (in-process ablation)"
                for c in summary["claims"] if c["status"] != "held"]
    interrupted = False
    if not args.no_load:
        try:
            summary["load_test"] = _load_test(args, spec, controller, results, console, len(x), stretch_durations)
            failures += [f"load test: {f}" for f in summary["load_test"]["gate_failures"]]
        except KeyboardInterrupt:
            interrupted = True
            summary["load_test"] = _interrupted_load_test(results, console)

    for path in filter(None, (args.json_path, results / "validate.json")):
        _write_json(path, summary)
        console.print(f"figures written to {path}", highlight=False)
    if args.mlflow:
        _log_mlflow(args, results, summary, console)
    load = summary.get("load_test") or {}
    verdict = load.get("verdict") or _in_process_verdict(summary, interrupted)
    console.print(verdict, highlight=False, markup=False, soft_wrap=True)  # one verdict line, last
    if interrupted:
        stderr.print("interrupted: the finished ablation and every recorded request are on disk", highlight=False)
        return EXIT_INTERRUPTED
    if args.gate and failures:
        stderr.print("gate: " + "; ".join(failures), soft_wrap=True, highlight=False, markup=False)
        return EXIT_GATE
    return 0


def _log_mlflow(args, results: Path, summary: dict, console: Console) -> None:
    load = {"requests": args.requests, "warmup": args.warmup, "device": args.device, "energy": args.energy,
            "country": args.country, "no_load": args.no_load, "shape": args.load_shape, "users": args.load_users,
            "phase_s": args.load_phase_s, "run_time_s": args.load_s, "arrival_rate_rps": args.load_arrival_rate}
    try:
        uri, run_id = log_validate(args.mlflow, args.mlflow_experiment, results, summary, load)
    except GreenMLOpsError as exc:
        raise GreenMLOpsError(f"{exc}; the results are kept in {results}: log them later with "
                              f"'green-mlops report {results} --mlflow {args.mlflow}'") from exc
    console.print(f"MLflow: run {run_id} in {uri} (experiment {args.mlflow_experiment})",
                  highlight=False, markup=False, soft_wrap=True)


def _print_dashboard_url(console: Console):
    """Echo the locustfile's line naming the gateway it started and its live dashboard."""
    def echo(line: str) -> None:
        if "dashboard http" in line:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    return echo


def _calibration(spec, config, args, backend):
    """The per-exit calibration the controller uses, unless the user set τ∞ explicitly."""
    from targets.control.calibration import calibration_for
    if tau_inf_is_explicit(args) or config.policy == "budget":
        return None  # τ∞ from the user, or from the budget's certificate (validate.json → budget)
    return calibration_for(spec, config.uncertainty, backend)


def _in_process_verdict(summary: dict, interrupted: bool = False) -> str:
    parts = [f"{word}: in-process " + ", in-process ".join(c["name"] for c in summary["claims"] if c["status"] == status)
             for status, word in STATUS_WORDS.items() if any(c["status"] == status for c in summary["claims"])]
    parts += ["decided on one-sided 95 % bounds",
              "load test interrupted: nothing judged under load" if interrupted else
              "no load test (--no-load): nothing judged under load"]
    return "verdict: " + " · ".join(parts)


def _load_spec(args, config_path: Path, schedule_path: Path | None) -> LoadSpec:
    return LoadSpec(shape=args.load_shape, base_users=args.load_users, phase_s=args.load_phase_s,
                    run_time_s=args.load_s, arrival_rate=args.load_arrival_rate, seed=args.load_seed,
                    schedule=schedule_path, model=str(args.model), energy=args.energy, country=args.country,
                    controller_config=config_path, backend=args.backend)


TRITON_WARMUP_REQUESTS = 32  # one-row requests per model before the first run: Python-backend imports, first runs


def _start_triton(args, spec, controller, results: Path, console: Console):
    """``--backend triton``: a repository with ``<model>_full``, the stages and ``<model>_bio``
    carrying this controller (the thresholds certified above), a server on loopback for the whole
    load stage (its log in ``results/triton.log``), and both models warmed up. The caller stops it."""
    from targets.control.controller_bundle import controller_bundle
    from targets.backends.kserve import datatype_of
    from targets.serving.triton_repo import RepoOptions, write_repository
    from targets.backends.triton_server import TritonServer
    from targets.backends.triton_target import TritonTarget

    from targets.cpus import cpu_list, split_for_load_test

    split = split_for_load_test()  # Locust and the server on disjoint CPUs, as with the gateway
    repo = results / "triton-repo"
    options = RepoOptions(flavour=args.triton_flavour, bio_stages=args.triton_bio_stages)
    write_repository(spec, repo, options, bio_bundle=controller_bundle(controller))
    started = time.monotonic()
    server = TritonServer(repo, server=args.triton_server, log_path=results / "triton.log", startup_timeout_s=120.0,
                          cpus=split[1] if split else None)
    server.cpu_sets = {"load_generator": split[0], "server": split[1]} if split else None
    try:
        import tritonclient.http as triton_http

        target = TritonTarget(spec, server.url)
        rows = spec.load_validation()[0][:TRITON_WARMUP_REQUESTS]
        client = triton_http.InferenceServerClient(server.url)
        for row in rows:
            x = target.check(row[None])  # a text row loses its trailing padding, as a client's would
            target.full_probabilities(x)
            tensor = triton_http.InferInput(spec.input_name, list(x.shape), datatype_of(spec.input_dtype))
            tensor.set_data_from_numpy(x, binary_data=True)
            client.infer(f"{spec.name}_bio", [tensor])
    except BaseException:
        server.stop()
        raise
    console.print(f"Triton at {server.url} ({args.triton_flavour} flavour, bio stages {options.bio_stages_run}; "
                  f"repository {repo}; log {server.log_path}): "
                  f"{spec.name}_full for standard, {spec.name}_bio for bio; ready and warmed up in "
                  f"{time.monotonic() - started:.0f} s; "
                  + (f"Locust on CPUs {cpu_list(split[0])}, Triton on CPUs {cpu_list(split[1])}" if split else
                     "Locust and Triton share every CPU"), highlight=False, markup=False, soft_wrap=True)
    return server


def _shape(args) -> Shape:
    try:
        return Shape(args.load_shape, ShapeParams(base_users=args.load_users, peak_users=2 * args.load_users,
                                                  phase_s=args.load_phase_s, run_time_s=args.load_s))
    except ValueError as exc:
        raise GreenMLOpsError(f"load test: {exc}") from exc


def _size_offered_load(args, spec, results: Path, console: Console, host: str | None,
                       stretch_durations: bool) -> Sizing:
    """``--load-arrival-rate auto``: probe the standard path as the load test will serve it (a
    gateway with the controller off on the gateway's CPUs, or Triton's ``<model>_full``), then set
    ``args.load_arrival_rate`` to the sized base rate and, with ``stretch_durations`` (neither
    length given), stretch ``args.load_s`` and ``args.load_phase_s`` (see :mod:`loadtests.capacity`).
    The sizing is written to ``offered_load.json`` before any run, and printed."""
    from loadtests.gateway_process import GatewayProcess
    from targets.cpus import cpu_list, split_for_load_test

    shape = _shape(args)
    bodies = infer_bodies(spec.load_eval()[0], spec.input_name)
    gateway = None
    try:
        with console.status("sizing the offered load: the standard path, one request at a time …"):
            if host is None:
                split = split_for_load_test()  # the CPUs the load test's gateways get
                gateway = GatewayProcess("--model", str(args.model), "--energy", "off", "--controller", "off",
                                         log_path=results / "offered-load-probe.log",
                                         cpus=split[1] if split else None)
                target = "gateway --controller off" + (f" on CPUs {cpu_list(split[1])}" if split else "")
                url, path = gateway.url, f"/v2/models/{spec.name}/infer"
            else:
                target, url, path = f"Triton {spec.name}_full", host, f"/v2/models/{spec.name}_full/infer"
            probe = probe_round_trips(url, path, bodies)
    except (ProbeError, RuntimeError) as exc:
        raise GreenMLOpsError(f"sizing the offered load: {exc}; give the rate with --load-arrival-rate N") from exc
    finally:
        if gateway is not None:
            gateway.stop()
    rate, capped = size_arrival_rate(probe.capacity_rps, shape.peak_factor)
    stretch = duration_stretch(rate) if stretch_durations else 1.0
    sizing = Sizing(rate, probe, target, shape.peak_factor, PEAK_UTILISATION, CEILING_RPS, capped, stretch)
    args.load_arrival_rate = rate
    args.load_s = int(math.ceil(args.load_s * stretch))
    args.load_phase_s = round(args.load_phase_s * stretch, 3)
    _write_json(results / OFFERED_LOAD_FILE, sizing.as_dict())
    console.print(sizing.line(), highlight=False, markup=False, soft_wrap=True)
    return sizing


def _write_schedule(args, results: Path, n_rows: int, replicate: int = 1) -> Path | None:
    """Open loop: the one schedule both runs of a replicate replay (None in closed loop):
    ``schedule.json`` for the first, ``schedule-rK.json`` (seed ``--load-seed`` + K − 1) after."""
    if args.load_arrival_rate <= 0:
        return None
    try:
        schedule = make_schedule(args.load_arrival_rate, _shape(args), n_rows, args.load_seed + replicate - 1)
    except (ScheduleError, ValueError) as exc:
        raise GreenMLOpsError(f"load test: {exc}") from exc
    name = SCHEDULE_FILE if replicate == 1 else f"{Path(SCHEDULE_FILE).stem}-r{replicate}.json"
    return schedule.save(results / name)


def replicate_plan(repeats: int) -> list[tuple[int, str, str]]:
    """(replicate, run name, scenario) in the order they run: counterbalanced, standard first in odd
    replicates and bio first in even ones (standard, bio | bio, standard | …), so a drift of the
    machine over the job lands on both modes alike. Replicate 1's runs are ``standard`` and ``bio``;
    replicate K's ``standard-rK`` and ``bio-rK``."""
    plan = []
    for k in range(1, repeats + 1):
        suffix = "" if k == 1 else f"-r{k}"
        modes = ("standard", "bio") if k % 2 else ("bio", "standard")
        plan += [(k, mode + suffix, mode) for mode in modes]
    return plan


def _load_test(args, spec, controller, results: Path, console: Console, n_rows: int,
               stretch_durations: bool = False) -> dict:
    """Standard then bio under Locust with a congestion pattern, then the report over both. Through
    a gateway per run, or (``--backend triton``) against one Triton server started here."""
    triton = _start_triton(args, spec, controller, results, console) if args.backend == "triton" else None
    try:
        return _load_runs(args, spec, controller.config, results, console, n_rows,
                          host=None if triton is None else f"http://{triton.url}",
                          cpu_sets=None if triton is None else triton.cpu_sets, stretch_durations=stretch_durations)
    finally:
        if triton is not None:
            triton.stop()


def _load_runs(args, spec, config, results: Path, console: Console, n_rows: int, host: str | None,
               cpu_sets: dict | None = None, stretch_durations: bool = False) -> dict:
    sizing = (_size_offered_load(args, spec, results, console, host, stretch_durations)
              if args.load_arrival_rate == AUTO_RATE else None)
    config_path = results / "controller.toml"
    config_path.write_text(_toml(asdict(config)))
    schedules = {k: _write_schedule(args, results, n_rows, k) for k in range(1, args.repeats + 1)}
    schedule_path = schedules[1]
    load = _load_spec(args, config_path, schedule_path)
    loop = (f"open loop, {args.load_arrival_rate:g} req/s base" if schedule_path else
            "closed loop (unequal offered load: no claim is decided)")
    runs = [(name, scenario, replace(load, schedule=schedules[k], seed=args.load_seed + k - 1))
            for k, name, scenario in replicate_plan(args.repeats)]
    if args.compare_policies:
        # The other policy, on the same schedule, into bio-<policy>: the report sets them side by side.
        other = "paper" if config.policy == "budget" else "budget"
        other_config = asdict(replace(config, policy=other))
        if other == "budget" and not tau_inf_is_explicit(args):
            other_config.pop("tau_inf"), other_config.pop("exit_tau_inf")  # τ∞ from the certificate
        other_path = results / f"controller-{other}.toml"
        other_path.write_text(_toml(other_config))
        # On replicate 1's schedule, right after its bio run.
        runs.insert(2, (f"bio-{other}", "bio", replace(load, controller_config=other_path)))
    for position, (name, scenario, spec_) in enumerate(runs, start=1):
        started = time.monotonic()
        schedule = f", schedule {spec_.schedule.name}" if spec_.schedule else ""
        with console.status(f"load test {position}/{len(runs)}: {name} · {load.shape} · {loop}{schedule} · "
                            f"{load.run_time_s} s …"):
            run_scenario(scenario, results / name, spec_, host=host, on_line=_print_dashboard_url(console),
                         cpu_sets=cpu_sets)
        console.print(f"load test {position}/{len(runs)} {name}: done in {time.monotonic() - started:.0f} s "
                      f"({loop}{schedule})", highlight=False, markup=False)
    offered = sizing.as_dict() if sizing is not None else {"source": "given", "arrival_rate_rps": args.load_arrival_rate}
    return {**_report(results, console), "offered_load": offered}


def _report(results: Path, console: Console) -> dict:
    from reports.render import print_report

    report = build_report(results, results)
    print_report(report, console, verdict=False)  # validate prints the verdict line last
    console.print(f"report: {results / 'report.html'}", highlight=False, soft_wrap=True, markup=False)
    return {"results": str(results), "valid": report["valid"], "invalid_reasons": report["invalid_reasons"],
            "claims": report["claims"], "comparison": report["comparison"], "verdict": report["verdict"],
            "gate_failures": gate_failures(report)}


def _interrupted_load_test(results: Path, console: Console) -> dict:
    """Ctrl-C during the load stage: the partial report over what was recorded, if any."""
    try:
        document = _report(results, console)
    except (GreenMLOpsError, OSError, ValueError) as exc:
        document = {"results": str(results), "report_error": str(exc)}
    return {**document, "interrupted": True}
