"""Experiment tracking with MLflow: every validate run or report kept as an MLflow run.

``validate --mlflow [URI]`` and ``report --mlflow [URI]`` call :func:`log_validate` /
:func:`log_report` once their files are written. A run holds

* **params**: the controller's configuration, the model and provider, the load (shape, users,
  phase length, duration, arrival rate), the validity rules, each load run's conditions;
* **metrics**: every number of ``validate.json`` (prefix ``ablation.``) and of the report's
  ``summary.json`` (prefix ``load.``): every claim's measured value and interval, whether it held
  (1/0), per-run and per-phase latency (p50/p95/p99, mean), throughput, admission, accuracy, energy
  and CO2. An energy or CO2 figure's name ends with its kind, ``.measured`` or ``.estimated``, and
  its full source label is a tag (``…energy_source``), so an estimate never reads as a measurement;
  and, per load run, histories per second (``load.runs.bio.per_second.p95_ms`` at step = second):
  requests and answers per second, rejected rate, p50/p95, admission rate, accuracy;
* **tags**: sources, claim statuses, validity and its reasons;
* **artifacts**: the whole results directory: report (HTML, Markdown, ``summary.json``), plots,
  ``validate.json``, the controller's TOML, and every run's records (``requests.jsonl``, ``run.json``,
  energy ``windows.jsonl`` and ``timeline.jsonl``).

MLflow is an optional extra (``pip install 'green-mlops[mlflow]'``). The default URI is a local
``./mlruns`` file store; MLflow ≥ 3.7 keeps that store only on request, so for a file store this
module sets ``MLFLOW_ALLOW_FILE_STORE=true`` (any other URI, e.g. ``sqlite:///mlflow.db`` or
``http://host:5000``, is used as given). Pure functions turn documents into params, metrics and tags;
only :func:`log_run` talks to MLflow. Reports read files here and never re-run a model.
"""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from targets.errors import GreenMLOpsError

DEFAULT_URI = "./mlruns"
DEFAULT_EXPERIMENT = "green-mlops"
PARAM_SECTIONS = ("controller", "validity_rules", "conditions", "warmup")  # settings, not results
BATCH = 100  # MLflow's log_batch takes at most 1000 metrics, 100 params and 100 tags per call
_KEY = re.compile(r"[^A-Za-z0-9_\-. /:]")


def require_mlflow():
    """The mlflow module, or a clear error naming the extra to install."""
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError as exc:
        raise GreenMLOpsError("--mlflow needs MLflow: pip install 'green-mlops[mlflow]' "
                              "(or mlflow-skinny / mlflow)") from exc
    return mlflow


def resolve_uri(uri: str | None) -> str:
    """A tracking URI: a path (the default ``./mlruns``) becomes an absolute ``file://`` store."""
    uri = uri or DEFAULT_URI
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _key(*parts) -> str:
    return _KEY.sub("_", ".".join(str(p) for p in parts if p != ""))[:250]


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _kind(source) -> str | None:
    """``measured`` or ``estimated`` from a source label such as ``estimated:codecarbon``."""
    if not isinstance(source, str) or source in ("", "none"):
        return None
    kinds = {part.split(":")[0] for part in source.split("+")}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _list_key(item: dict, index: int):
    for name in ("name", "phase", "run", "tau_inf"):
        if name in item and isinstance(item[name], (str, int, float)):
            return item[name]
    return index


def flatten(document: dict, prefix: str = "") -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """``(metrics, params, tags)`` of a JSON document (see the module docstring for the rules)."""
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    tags: dict[str, str] = {}

    def settings(value, path):
        if isinstance(value, dict):
            for k, v in value.items():
                settings(v, (*path, k))
        elif value is not None:
            params[_key(*path)] = str(value)[:6000]

    def walk(value, path):
        if isinstance(value, dict):
            energy_kind = _kind(value.get("energy_source"))
            co2_kind = _kind(value.get("co2_source")) or energy_kind
            for k, v in value.items():
                if k in PARAM_SECTIONS:
                    settings(v, (*path, k))
                    continue
                number = _number(v)
                if number is not None:
                    name = (*path, k)
                    if "co2" in k and co2_kind:
                        name = (*name, co2_kind)
                    elif "energy" in k and k != "energy_norm" and energy_kind:
                        name = (*name, energy_kind)
                    metrics[_key(*name)] = number
                elif isinstance(v, str):
                    if k.endswith("_source") or k in ("status", "source"):
                        tags[_key(*path, k)] = v
                    elif k in ("model", "provider", "scenario", "name"):
                        params[_key(*path, k)] = v
                    if k == "status" and v in ("held", "not_held", "inconclusive"):
                        metrics[_key(*path, "held")] = float(v == "held")
                else:
                    walk(v, (*path, k))
        elif isinstance(value, list):
            if len(value) == 2 and all(_number(v) is not None for v in value) and path and "bounds95" in str(path[-1]):
                metrics[_key(*path, "low")], metrics[_key(*path, "high")] = (_number(v) for v in value)
            elif value and all(isinstance(v, str) for v in value):
                tags[_key(*path)] = "; ".join(value)[:5000]
            else:
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        walk(item, (*path, _list_key(item, i)))

    walk(document, (prefix,) if prefix else ())
    return metrics, params, tags


def per_second(records: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Each load run's figures per whole second since its first intended send, as MLflow metric
    histories: ``name -> [(step, unix time s, value)]``. Seconds with no request are left out;
    latency and admission only count served requests (answered or rejected by the controller)."""
    timed = [r for r in records if isinstance(r.get("t_intended"), (int, float))]
    if not timed:
        return {}
    start = min(r["t_intended"] for r in timed)
    seconds: dict[int, list[dict]] = {}
    for r in timed:
        seconds.setdefault(int(r["t_intended"] - start), []).append(r)
    series: dict[str, list[tuple[int, float, float]]] = {}

    def add(name, step, value):
        if value is not None and math.isfinite(value):
            series.setdefault(name, []).append((step, start + step, float(value)))

    for step in sorted(seconds):
        rows = seconds[step]
        served = [r for r in rows if r.get("status") in (200, 503)]
        answered = [r for r in rows if r.get("status") == 200]
        add("requests_per_s", step, len(rows))
        add("answered_per_s", step, len(answered))
        add("rejected_rate", step, sum(r.get("status") == 503 for r in served) / len(served) if served else None)
        latencies = [r["latency_ms"] for r in served if isinstance(r.get("latency_ms"), (int, float))]
        if latencies:
            ordered = sorted(latencies)
            add("p50_ms", step, ordered[(len(ordered) - 1) // 2])
            add("p95_ms", step, ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)])
        add("admission_rate", step, sum(bool(r.get("admitted")) for r in served) / len(served) if served else None)
        add("accuracy", step, sum(bool(r.get("correct")) for r in rows) / len(rows))
    return series


def run_histories(results: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Per-second histories of every recorded run under ``results`` (``load.runs.NAME.per_second.…``)."""
    from reports.runs import find_runs

    try:
        runs = find_runs(results)
    except GreenMLOpsError:
        return {}
    return {_key("load.runs", run.name, "per_second", name): values
            for run in runs for name, values in per_second(run.records).items()}


def validate_documents(validate_doc: dict, summary_doc: dict | None, load: dict) -> tuple[dict, dict, dict]:
    """Params, metrics and tags of a ``validate`` run: the in-process ablation (``ablation.``),
    the load test's report (``load.``) and the load's settings."""
    ablation = {k: v for k, v in validate_doc.items() if k != "load_test"}
    metrics, params, tags = flatten(ablation, "ablation")
    if summary_doc is not None:
        m, p, t = flatten(summary_doc, "load")
        metrics |= m
        params |= p
        tags |= t
    params |= {_key("load", k): str(v) for k, v in load.items() if v is not None}
    params |= {"model": str(validate_doc.get("model")), "provider": str(validate_doc.get("provider"))}
    tags |= {"green_mlops.command": "validate"}
    if summary_doc is not None:
        tags["load.valid"] = str(summary_doc.get("valid"))
    return params, metrics, tags


def report_documents(summary_doc: dict) -> tuple[dict, dict, dict]:
    """Params, metrics and tags of a ``report`` run."""
    metrics, params, tags = flatten(summary_doc, "load")
    tags |= {"green_mlops.command": "report", "load.valid": str(summary_doc.get("valid"))}
    return params, metrics, tags


def log_run(uri: str | None, experiment: str, run_name: str, params: dict, metrics: dict, tags: dict,
            artifacts: dict[str, Path], histories: dict | None = None) -> tuple[str, str]:
    """Log one MLflow run; ``artifacts`` maps an artifact folder ('' for the root) to a local file
    or directory; ``histories`` maps a metric to its ``(step, unix s, value)`` series. Returns
    ``(tracking URI, run id)``; GreenMLOpsError when MLflow fails."""
    require_mlflow()
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    resolved = resolve_uri(uri)
    if resolved.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        client = MlflowClient(tracking_uri=resolved)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags})
        run_id = run.info.run_id
        now_ms = int(time.time() * 1000)
        metric_items = [Metric(k, v, now_ms, 0) for k, v in sorted(metrics.items())]
        metric_items += [Metric(k, value, int(t_s * 1000), step) for k, values in sorted((histories or {}).items())
                         for step, t_s, value in values]
        param_items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, max(len(metric_items), len(param_items)), BATCH):
            client.log_batch(run_id, metrics=metric_items[start : start + BATCH],
                             params=param_items[start : start + BATCH])
        for folder, path in artifacts.items():
            if path.is_dir():
                client.log_artifacts(run_id, str(path), folder or None)
            elif path.is_file():
                client.log_artifact(run_id, str(path), folder or None)
        client.set_terminated(run_id, "FINISHED")
    except (MlflowException, OSError) as exc:
        raise GreenMLOpsError(f"MLflow logging to {resolved} failed: {exc}") from exc
    return resolved, run_id


def log_validate(uri: str | None, experiment: str, results: Path, validate_doc: dict, load: dict) -> tuple[str, str]:
    """Log a finished ``validate`` (its results directory, as written) as one MLflow run."""
    import json

    summary_path = results / "summary.json"
    summary_doc = json.loads(summary_path.read_text()) if summary_path.exists() else None
    params, metrics, tags = validate_documents(validate_doc, summary_doc, load)
    name = f"validate {validate_doc.get('model')} {results.name}"
    return log_run(uri, experiment, name, params, metrics, tags, {"": results}, run_histories(results))


def log_report(uri: str | None, experiment: str, results: Path, out: Path, summary_doc: dict) -> tuple[str, str]:
    """Log a report (written into ``out``) and the recorded runs under ``results`` as one MLflow run."""
    params, metrics, tags = report_documents(summary_doc)
    artifacts = {"": out}
    if results.resolve() != out.resolve():
        artifacts["records"] = results
    return log_run(uri, experiment, f"report {results.name}", params, metrics, tags, artifacts,
                   run_histories(results))
