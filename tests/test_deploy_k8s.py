"""deploy/k8s and deploy/kserve: every manifest passes its schema (Kubernetes' strict OpenAPI
schemas for the core kinds, KServe's InferenceService schema generated from its SDK's OpenAPI
models: tests/k8s_schemas.py), a planted mistake fails it, and the manifests agree with each other
and with the CLI and the locustfile they run. They cannot be applied here (no cluster)."""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from green_mlops.cli import _parser
from tests.k8s_schemas import kserve_validator, kubernetes_errors

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) + sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.relative_to(ROOT)}:{document['kind']}/{document['metadata']['name']}", document))
    return found


def by_kind(kind: str, name: str | None = None) -> dict:
    matches = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


@pytest.fixture(scope="module")
def isvc_validator():
    return kserve_validator()


def test_there_are_manifests_for_what_the_issue_names():
    kinds = {d["kind"] for _, d in documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Job", "InferenceService"} <= kinds


@pytest.mark.parametrize("where, document", documents(), ids=[w for w, _ in documents()])
def test_every_manifest_passes_its_schema(where, document, isvc_validator):
    if document["kind"] == "InferenceService":
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in isvc_validator.iter_errors(document)]
    else:
        errors = kubernetes_errors(document)
    assert errors == [], where


def test_the_schemas_reject_planted_mistakes(isvc_validator):
    deployment = copy.deepcopy(by_kind("Deployment", "green-mlops-triton"))
    deployment["spec"]["replicas"] = "two"
    assert kubernetes_errors(deployment)
    deployment = copy.deepcopy(by_kind("Deployment", "green-mlops-triton"))
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 8000  # not a Container field
    assert kubernetes_errors(deployment)
    hpa = copy.deepcopy(by_kind("HorizontalPodAutoscaler"))
    hpa["spec"]["metrics"][0]["pods"]["target"]["type"] = 7
    assert kubernetes_errors(hpa)
    isvc = copy.deepcopy(by_kind("InferenceService"))
    isvc["spec"]["predictor"]["triton"]["storage_uri"] = "pvc://x"  # the SDK's attribute, not the JSON key
    assert any("storage_uri" in e.message for e in isvc_validator.iter_errors(isvc))
    isvc = copy.deepcopy(by_kind("InferenceService"))
    isvc["spec"]["predictor"]["triton"]["resources"]["limits"]["memory"] = ["8Gi"]  # a Kubernetes type inside
    assert list(isvc_validator.iter_errors(isvc))
    isvc = copy.deepcopy(by_kind("InferenceService"))
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    assert list(isvc_validator.iter_errors(isvc))


def _container(document: dict, name: str) -> dict:
    spec = document["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def _cli_args(container: dict) -> list[str]:
    return list(container["args"])


def test_the_repository_commands_are_valid_cli_calls_with_the_bio_model():
    for document, name in ((by_kind("Deployment", "green-mlops-triton"), "model-repository"),
                           (by_kind("Job", "green-mlops-model-repository"), "model-repository")):
        args = _cli_args(_container(document, name))
        parsed = _parser().parse_args(args)
        assert parsed.command == "triton" and parsed.triton_command == "repo"
        assert parsed.bio and parsed.flavour == "onnxruntime_onnx" and parsed.bio_stages == "bls"
    isvc = by_kind("InferenceService")
    job = by_kind("Job", "green-mlops-model-repository")
    out = _cli_args(_container(job, "model-repository"))
    mount = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert out[out.index("--out") + 1].startswith(mount)
    assert isvc["spec"]["predictor"]["triton"]["storageUri"] == (
        f"pvc://{claim}/{out[out.index('--out') + 1].removeprefix(mount).strip('/')}")
    assert by_kind("PersistentVolumeClaim")["metadata"]["name"] == claim


def test_triton_deployment_service_and_autoscaler_agree():
    deployment, service = by_kind("Deployment", "green-mlops-triton"), by_kind("Service", "green-mlops-triton")
    pod = deployment["spec"]["template"]
    assert all(pod["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    triton = _container(deployment, "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    for flag, name in (("--http-port", "http"), ("--grpc-port", "grpc"), ("--metrics-port", "metrics")):
        assert f"{flag}={ports[name]}" in triton["args"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    repository = _cli_args(_container(deployment, "model-repository"))
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    assert f"--model-repository={mounts['models']}" in triton["args"]
    assert repository[repository.index("--out") + 1] == mounts["models"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    rules = yaml.safe_load(by_kind("ConfigMap", "green-mlops-prometheus-adapter-rules")["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in rules["rules"]}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in served
    query = rules["rules"][0]["metricsQuery"]
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= set(
        re.findall(r"\b(nv_inference_\w+)\{", query))


def test_prometheus_scrapes_annotated_pods_with_the_labels_the_adapter_needs():
    config = yaml.safe_load(by_kind("ConfigMap", "green-mlops-prometheus")["data"]["prometheus.yml"])
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__", "__metrics_path__"} <= targets
    deployment = by_kind("Deployment", "green-mlops-prometheus")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]
    binding = by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == by_kind("ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == by_kind("ServiceAccount")["metadata"]["name"]


def _locust_args(job: dict) -> list[str]:
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    words = shlex.split(re.sub(r'"\$\(python -c [^)]*\)\)"', "LOCUSTDIR", script))
    assert words[:2] == ["exec", "locust"]
    return words[2:]


def test_locust_master_and_workers_agree_with_each_other_and_with_the_locustfile():
    master_job, workers_job = by_kind("Job", "green-mlops-locust-master"), by_kind("Job", "green-mlops-locust-workers")
    master, worker = _locust_args(master_job), _locust_args(workers_job)
    value = lambda args, flag: args[args.index(flag) + 1]  # noqa: E731
    assert int(value(master, "--expect-workers")) == workers_job["spec"]["parallelism"] == workers_job["spec"]["completions"]
    service = by_kind("Service", "green-mlops-locust-master")
    assert value(worker, "--master-host") == service["metadata"]["name"]
    assert int(value(worker, "--master-port")) == service["spec"]["ports"][0]["port"] == int(value(master, "--master-bind-port"))
    assert service["spec"]["selector"].items() <= master_job["spec"]["template"]["metadata"]["labels"].items()
    triton = by_kind("Service", "green-mlops-triton")
    http = next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "http")
    assert value(master, "--host") == f"http://{triton['metadata']['name']}:{http}" and value(master, "--backend") == "triton"
    assert float(value(master, "--arrival-rate")) > 0  # open loop: one schedule, partitioned over the workers
    # every option the pods pass is Locust's own (its --help) or one the locustfile adds (scenario.py)
    help_text = subprocess.run([sys.executable, "-m", "locust", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    ours = set(re.findall(r'group\.add_argument\("(--[a-z-]+)"', (ROOT / "loadtests" / "scenario.py").read_text()))
    assert "--arrival-rate" in ours and "--backend" in ours
    for flag in [w for w in master + worker if w.startswith("--")]:
        assert flag in ours or re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), flag
