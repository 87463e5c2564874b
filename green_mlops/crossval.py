"""`green-mlops crossval`: compare the calibration rules out of fold, the held-out set deciding nothing.

Loads the model, pools its validation and held-out rows, runs every stage graph over the pool
once (no retraining), takes the stage costs (model.json → ``build.stage_cost_ms`` and
``build.full_cost_ms`` when recorded, else measured here: the median batch-1 time of each stage
and of ``full.onnx`` with ONNX Runtime CPU; ``--costs unit`` counts every stage as 1), then hands
everything to :mod:`targets.control.crossval` and prints one table (rich, markup off); ``--json PATH``
writes the figures. Bad input is one line and exit 2 (through the CLI's error handling).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from green_mlops.models import resolve_model
from green_mlops.run_setup import EXIT_OK, stderr, stdout
from targets.control.calibration import ladder_outputs
from targets.control.crossval import DEFAULT_REPEATS, Pool, crossval, splits, standard_rules
from targets.errors import ConfigError, GreenMLOpsError
from targets.backends.ort_target import OnnxRuntimeTarget


def pool_inputs(a: np.ndarray, b: np.ndarray, pad_id: int = 0) -> np.ndarray:
    """Rows of ``a`` then ``b``; text inputs of different widths padded with ``pad_id`` on the right."""
    if a.ndim == 2 and b.ndim == 2 and a.shape[1] != b.shape[1] and np.issubdtype(a.dtype, np.integer):
        width = max(a.shape[1], b.shape[1])
        a, b = (np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=pad_id) for m in (a, b))
    return np.concatenate([a, b])


def measure_costs_ms(backend, x: np.ndarray, rows: int = 200, warmup: int = 20) -> tuple[list[float], float]:
    """Median batch-1 ms of each stage and of ``full.onnx`` over the first ``rows`` rows of ``x``,
    the full graph and the chained stages timed back to back on each row, in alternating order
    (so a busy machine's drift, and whichever runs second, land on both alike); the first
    ``warmup`` rows are run and not counted."""
    sample = [backend.check(x[i : i + 1]) for i in range(min(rows, len(x)))]
    timings = np.zeros((len(sample), backend.n_stages + 1))
    skip = min(warmup, len(sample))

    def full(row):
        started = time.perf_counter_ns()
        backend.full_probabilities(row)
        return [(time.perf_counter_ns() - started) / 1e6]

    def ladder(row):
        took, hidden = [], row
        for index in range(backend.n_stages):
            started = time.perf_counter_ns()
            _, hidden = backend.stage(index, hidden)
            took.append((time.perf_counter_ns() - started) / 1e6)
        return took

    for n, row in enumerate([*sample[:skip], *sample]):
        if n % 2:
            stages_ms = ladder(row)
            full_ms = full(row)
        else:
            full_ms = full(row)
            stages_ms = ladder(row)
        if n >= skip:
            timings[n - skip] = full_ms + stages_ms
    medians = np.median(timings, axis=0)
    return [float(v) for v in medians[1:]], float(medians[0])


def stage_costs(spec, backend, x: np.ndarray, mode: str, rows: int = 200) -> tuple[list[float], float, str]:
    """``(cost per stage, cost of the standard path, source)`` in ms, or in stages for ``unit``."""
    if mode == "unit":
        return [1.0] * backend.n_stages, float(backend.n_stages), "unit: every stage costs 1, the standard path all"
    build = spec.meta.get("build") or {}
    recorded, full = build.get("stage_cost_ms"), build.get("full_cost_ms")
    if isinstance(recorded, list) and len(recorded) == backend.n_stages and isinstance(full, (int, float)):
        return [float(c) for c in recorded], float(full), "model.json: build.stage_cost_ms, build.full_cost_ms"
    costs, full_ms = measure_costs_ms(backend, x, rows=rows)
    return costs, full_ms, (f"measured: median batch-1 ms over {min(rows, len(x))} rows, full graph and stages "
                            f"back to back in alternating order, ONNX Runtime {backend.provider}")


def run_crossval(args) -> int:
    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    repeats = args.repeats or DEFAULT_REPEATS[args.scheme]
    rules = standard_rules(args.accuracy_budget_pp, args.risk)  # checks the budget flags before any work
    spec = resolve_model(args.model)
    x_val, y_val = spec.load_validation()
    if args.pool == "validation":  # the held-out set stays sealed: two thirds fit, one third scores
        x_eval, y_eval = x_val[:0], y_val[:0]
        n_fit = (2 * len(y_val)) // 3
    else:
        x_eval, y_eval = spec.load_eval()
        n_fit = len(y_val)
    split_list = splits(len(y_val) + len(y_eval), args.scheme, repeats, args.seed, n_fit=n_fit, folds=args.folds)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x = pool_inputs(x_val, x_eval, spec.tokenizer_pad_id)
    stderr.print(f"crossval: model {spec.name}; running {spec.n_stages} stages once over {len(x)} rows "
                 f"({len(y_val)} validation ∪ {len(y_eval)} held-out)")
    pool = Pool(ladder_outputs(backend, x), np.concatenate([y_val, y_eval]), args.uncertainty)
    costs, full_cost, cost_source = stage_costs(spec, backend, x, args.costs)
    results = crossval(pool, rules, split_list, costs, full_cost, args.loss_target_pp)
    fit_rows = len(split_list[0][0])
    scheme = (f"{repeats} random re-splits, fitted on {fit_rows} rows"
              f"{' (the validation size)' if args.pool == 'all' else ''}, scored on "
              f"{len(x) - fit_rows}" if args.scheme == "resplit" else
              f"{args.folds}-fold × {repeats} repetitions ({len(split_list)} folds), fitted on about {fit_rows} rows")
    document = {
        "model": spec.name, "directory": str(spec.directory), "split_seed": spec.split_seed,
        "heldout_digest": spec.heldout_digest, "measure": args.uncertainty,
        "pool": {"validation": len(y_val), "heldout": len(y_eval)}, "pool_rows": args.pool,
        "scheme": args.scheme, "folds": args.folds if args.scheme == "kfold" else None, "repeats": repeats,
        "seed": args.seed, "splits": len(split_list), "fit_rows": fit_rows,
        "costs": {"source": cost_source, "stage": costs, "standard": full_cost,
                  "unit": "stage" if args.costs == "unit" else "ms"},
        "loss_target_pp": args.loss_target_pp,
        "full_model_accuracy_pool": float(pool.full_right.mean()),
        "rules": results,
    }
    print_table(document)
    if args.json_path:
        try:
            args.json_path.parent.mkdir(parents=True, exist_ok=True)
            args.json_path.write_text(json.dumps(document, indent=2) + "\n")
        except OSError as exc:
            raise GreenMLOpsError(f"cannot write {args.json_path}: {exc}") from exc
        stdout.print(f"figures written to {args.json_path}")
    return EXIT_OK


def print_table(document: dict) -> None:
    """One row per rule: mean out-of-fold saving and loss with their 2.5–97.5 % ranges over splits,
    and the share of splits whose loss passes the target with its exact 95 % interval."""
    target = document["loss_target_pp"]
    table = Table(title=f"out-of-fold rules · model {document['model']} (split seed {document['split_seed']}) · "
                        f"{document['splits']} {document['scheme']} splits of {sum(document['pool'].values())} "
                        f"rows · seed {document['seed']}")
    for column in ("rule", "version", "saving % (2.5 … 97.5)", "loss pp (2.5 … 97.5)",
                   f"loss > {target:g} pp (95 % CI)", "stages"):
        table.add_column(column, justify="left" if column in ("rule", "version") else "right",
                         no_wrap=column == "rule")
    for r in document["rules"]:
        share = r["loss_above_target"]
        lo, hi = share["ci95"]
        note = f" ({r['uncertified_splits']} uncertified)" if r.get("uncertified_splits") else ""
        table.add_row(r["key"] + note, r["version"] or "–",
                      "{:.1f} ({:.1f} … {:.1f})".format(r["saving_pct"]["mean"], *r["saving_pct"]["range95"]),
                      "{:.2f} ({:.2f} … {:.2f})".format(r["loss_pp"]["mean"], *r["loss_pp"]["range95"]),
                      f"{100 * share['share']:.1f} % ({100 * lo:.1f} … {100 * hi:.1f})", f"{r['mean_stages']:.2f}")
    stdout.print(table)
    for r in document["rules"]:
        stdout.print(f"  {r['key']}: {r['rule']} — {r['description']}", soft_wrap=True)
    costs = document["costs"]
    stdout.print(f"stage costs ({costs['source']}): " + ", ".join(f"{c:.4g}" for c in costs["stage"])
                 + f"; standard path {costs['standard']:.4g} {costs['unit']}", soft_wrap=True)
    stdout.print("saving estimated from stage costs (the decision's cost and fixed per-request costs left out); "
                 "loss against the full model on the scored rows; ranges are the spread over splits", soft_wrap=True)
