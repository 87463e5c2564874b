"""deploy/: the Grafana dashboard names only metrics the gateway or Triton really export, and the
compose file, Prometheus config and Grafana provisioning agree with each other and with the CLI."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from green_mlops.cli import _parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "green-mlops.json"

# Triton's metric names as documented (docs/user_guide/metrics.md); the GPU ones cannot be read on
# a machine without a GPU, the others are checked against a real Triton's /metrics below.
TRITON_DOCUMENTED = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
    "nv_gpu_power_limit", "nv_energy_consumption", "nv_cpu_utilization", "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
}
TRITON_GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
                   "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption"}

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "clamp",
    "clamp_min", "clamp_max", "ceil", "floor", "round", "sqrt", "exp", "ln", "log2", "log10", "time", "vector",
    "scalar", "label_replace", "label_join", "sort", "sort_desc", "absent", "changes", "resets",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "quantile_over_time", "predict_linear", "holt_winters", "timestamp", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers, ranges,
    strings and by/without/on/ignoring/group_left lists that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges ($__rate_interval included)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(0), text[match.end():].lstrip()
        if word in PROMQL_WORDS or rest.startswith("("):
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] in ".$"):
            continue  # 1e3, 0.5, $variable
        names.add(word)
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page exports, histograms' _bucket/_sum/_count included, and
    families declared without a sample yet (e.g. energy while no window has closed)."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_expressions(document: dict) -> list[str]:
    return [t["expr"] for panel in document["panels"] for t in panel.get("targets", [])]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_checker_reads_promql_and_catches_a_misspelled_metric():
    assert promql_metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{job="x"}[$__rate_interval])))') \
        == {"a_bucket"}
    assert promql_metric_names("rate(x_total[1m]) / ignoring(source) group_left sum(rate(y_total[1m]))") \
        == {"x_total", "y_total"}
    assert promql_metric_names("100 * nv_gpu_utilization / 1e3") == {"nv_gpu_utilization"}
    exported = {"green_mlops_tau"}
    assert promql_metric_names("green_mlops_tua") - exported == {"green_mlops_tua"}


@pytest.fixture(scope="module")
def gateway_metrics(digits_eval):
    """A real gateway's /metrics (controller on, after a few labelled requests)."""
    from loadtests.gateway_process import GatewayProcess

    gateway = GatewayProcess("--controller", "bio")
    try:
        x, y = digits_eval
        with httpx.Client(base_url=gateway.url) as client:
            for i in range(5):
                body = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                    "data": x[i].ravel().tolist()}]}
                client.post("/v2/models/digits/infer", json=body, headers={"X-Green-MLOps-Label": str(int(y[i]))})
            return client.get("/metrics").text
    finally:
        gateway.stop()


def test_every_dashboard_expression_names_only_exported_metrics(dashboard, gateway_metrics):
    gateway = exported_names(gateway_metrics)
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 12
    used = set()
    for expr in expressions:
        names = promql_metric_names(expr)
        assert names, expr
        unknown = names - gateway - TRITON_DOCUMENTED
        assert not unknown, f"{expr}: {sorted(unknown)} is exported by neither the gateway nor Triton"
        used |= names
    # The panels the live page has are all there, Triton's included.
    for name in ("green_mlops_requests_total", "green_mlops_request_latency_seconds_bucket", "green_mlops_tau",
                 "green_mlops_admission_rate", "green_mlops_exit_depth_rows_total", "green_mlops_energy_norm",
                 "green_mlops_energy_per_request_joules", "green_mlops_co2_grams_total", "green_mlops_slo_seconds",
                 "green_mlops_labelled_rows_total", "nv_inference_queue_duration_us", "nv_gpu_power_usage"):
        assert name in used, name


def test_triton_names_in_the_dashboard_are_in_a_real_tritons_metrics(dashboard, triton_server):
    if not triton_server.metrics_url:
        pytest.skip("this Triton has no metrics URL")
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        real = exported_names(response.read().decode())
    used = set().union(*(promql_metric_names(e) for e in dashboard_expressions(dashboard)))
    triton_used = {n for n in used if n.startswith("nv_")}
    missing = triton_used - real - TRITON_GPU_ONLY
    assert not missing, f"not in Triton's /metrics: {sorted(missing)}"
    assert real & TRITON_DOCUMENTED  # the documented names are the real ones


def test_grafana_dashboard_and_provisioning_agree(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        assert all(t["datasource"]["uid"] == source["uid"] and t["expr"].strip() for t in panel["targets"])
        assert panel["id"] not in ids and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        ids.add(panel["id"])
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/green-mlops.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_compose_starts_gateway_triton_prometheus_grafana_consistently():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "triton", "prometheus", "grafana"} <= set(services)
    triton = services["triton"]
    image = triton["image"].split(":-", 1)[-1].rstrip("}")
    assert image.startswith("nvcr.io/nvidia/tritonserver:") and not image.endswith(":latest")
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Every command the gateway image runs is one our CLI accepts.
    for name in ("gateway", "model-repository"):
        command = [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", part) for part in services[name]["command"]]
        _parser().parse_args(command)
    gateway_command = services["gateway"]["command"]
    assert gateway_command[gateway_command.index("--triton-url") + 1] == "triton:8000"
    assert "--http-port=8000" in triton["command"] and "--metrics-port=8002" in triton["command"]
    build = services["model-repository"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    # Prometheus scrapes exactly the gateway's and Triton's metrics ports of the compose services.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in prometheus["scrape_configs"]}
    gateway_port = gateway_command[gateway_command.index("--port") + 1]
    assert targets == {"green-mlops-gateway": [f"gateway:{gateway_port}"], "triton": ["triton:8002"]}
    assert all(c.get("metrics_path", "/metrics") == "/metrics" for c in prometheus["scrape_configs"])


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    text = (DEPLOY / "Dockerfile").read_text()
    root = DEPLOY.parent
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (root / source).exists(), source
    assert 'ENTRYPOINT ["green-mlops"]' in text
    assert (DEPLOY / "Dockerfile.dockerignore").is_file()


def test_compose_file_is_valid_against_the_compose_specification(tmp_path):
    """The Compose Specification's JSON schema (vendored by check-jsonschema): no Docker needed."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*command, str(DEPLOY / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((DEPLOY / "docker-compose.yml").read_text().replace("    shm_size: 1g", "    shm_sise: 1g"))
    assert subprocess.run([*command, str(broken)], capture_output=True, timeout=120).returncode == 1
