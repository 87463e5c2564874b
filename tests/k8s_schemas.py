"""JSON schemas for the manifests in deploy/: Kubernetes' own (the ``kubernetes-validate``
package's copies of the API server's OpenAPI, strict: unknown fields fail) and KServe's
InferenceService, generated from the OpenAPI models of KServe's Python SDK (the ``kserve`` wheel,
installed without its dependencies and never imported: its ``kserve/models/*.py`` are read as
text). Every KServe type becomes a strict object schema of its fields; the Kubernetes types it
uses (``V1Container``, ``V1ObjectMeta``, ``K8sIoApiAppsV1DeploymentStrategy`` …) refer to the
Kubernetes definitions; the few types of other projects (Knative, KEDA) are not checked.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import re
from pathlib import Path

KUBERNETES_VERSION = "1.34.0"
K8S_API = "https://kubernetes.io/api/"
PRIMITIVES = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
              "bool": {"type": "boolean"}, "object": {}, "datetime": {"type": "string"},
              "ResourceQuantity": {"type": ["string", "number"]}, "V1Time": {"type": "string"}}


def kubernetes_schema_dir() -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"


@functools.lru_cache(maxsize=1)
def kubernetes_definitions() -> dict:
    return json.loads((kubernetes_schema_dir() / "_definitions.json").read_text())


@functools.lru_cache(maxsize=1)
def kserve_models() -> dict[str, tuple[dict, dict]]:
    """``{class name: (openapi_types, attribute_map)}`` from the installed kserve wheel's files."""
    models = {}
    for file in importlib.metadata.files("kserve") or []:
        if not (str(file).startswith("kserve/models/") and str(file).endswith(".py")):
            continue
        tree = ast.parse(Path(file.locate()).read_text())
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            fields = {}
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                    if item.targets[0].id in ("openapi_types", "attribute_map"):
                        fields[item.targets[0].id] = ast.literal_eval(item.value)
            if len(fields) == 2:
                models[node.name] = (fields["openapi_types"], fields["attribute_map"])
    if not models:
        raise RuntimeError("the kserve wheel's OpenAPI models were not found: pip install --no-deps kserve")
    return models


def _kubernetes_ref(name: str) -> str | None:
    """The Kubernetes definition an SDK type name stands for, or None."""
    definitions = kubernetes_definitions()["$defs"]
    match = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d\w*?)([A-Z]\w+)", name)
    if match:
        key = f"io.k8s.api.{match.group(1).lower()}.{match.group(2).lower()}.{match.group(3)}"
        return key if key in definitions else None
    match = re.fullmatch(r"(V\d(?:alpha\d|beta\d)?)([A-Z]\w+)", name)
    if not match:
        return None
    version, kind = match.group(1).lower(), match.group(2)
    found = [key for key in definitions if key.endswith(f".{version}.{kind}")]
    preferred = [key for key in found if key.startswith(("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."))]
    return (preferred or found or [None])[0]


def kserve_schema(root: str = "V1beta1InferenceService") -> dict:
    """A draft 2020-12 schema of ``root`` (see the module docstring)."""
    models = kserve_models()
    defs: dict[str, dict] = {}

    def schema_of(type_name: str) -> dict:
        type_name = type_name.strip()
        if type_name in PRIMITIVES:
            return PRIMITIVES[type_name]
        match = re.fullmatch(r"list\[(.+)\]", type_name)
        if match:
            return {"type": "array", "items": schema_of(match.group(1))}
        match = re.fullmatch(r"dict\(str, (.+)\)", type_name)
        if match:
            return {"type": "object", "additionalProperties": schema_of(match.group(1))}
        if type_name in models:
            if type_name not in defs:
                defs[type_name] = {}  # placeholder: recursive types
                types, attributes = models[type_name]
                defs[type_name] = {"type": "object", "additionalProperties": False,
                                   "properties": {attributes[k]: schema_of(v) for k, v in types.items()}}
            return {"$ref": f"#/$defs/{type_name}"}
        key = _kubernetes_ref(type_name)
        if key is not None:
            return {"$ref": f"{K8S_API}_definitions.json#/$defs/{key}"}
        return {}  # Knative, KEDA, net/url: other projects' types, not checked here

    top = schema_of(root)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{K8S_API}kserve/{root}",
            **top, "$defs": defs}


def kserve_validator(root: str = "V1beta1InferenceService"):
    import jsonschema
    from referencing import Registry, Resource

    registry = Registry().with_resource(f"{K8S_API}_definitions.json",
                                        Resource.from_contents(kubernetes_definitions()))
    return jsonschema.Draft202012Validator(kserve_schema(root), registry=registry)


def kubernetes_errors(document: dict) -> list[str]:
    """Why ``document`` (a core Kubernetes object) fails its strict schema: empty when it passes."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc.message)]
    return []
