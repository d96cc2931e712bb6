"""Render the Helm charts with Helm's own engine (helm-python-sdk: the Helm v4 Go SDK
through ctypes, no helm binary) and check the objects against Kubernetes' OpenAPI schemas
(kubernetes-validate), strict: an unknown field is an error, as the API server's field
validation would make it. ``installed`` runs Helm's own install and uninstall actions
against a real API server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from kubernetes_validate import utils as kv_utils

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "helm"
CHART_NAMES = ("edgefleet", "edgefleet-agent")
NAMESPACE = "edgefleet-system"

# K3s follows upstream minors closely and edge fleets lag a few behind: every minor from
# 1.30 to the newest one kubernetes-validate ships.
OLDEST_KUBE = (1, 30)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# all_versions() lists each version twice (its plain and strict schema directories).
KUBE_VERSIONS: tuple[str, ...] = tuple(
    sorted({v for v in kv_utils.all_versions() if _minor(v) >= OLDEST_KUBE}, key=_minor)
)

# Custom resources, whose schemas kubernetes-validate does not ship: a focused schema of
# the fields the charts use (prometheus-operator's ServiceMonitor and PodMonitor,
# monitoring.coreos.com/v1).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}
# A scrape endpoint, the same in a ServiceMonitor's endpoints and a PodMonitor's
# podMetricsEndpoints.
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        # SafeAuthorization: a Secret key, never an inline token.
        "authorization": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "credentials": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["key"],
                    "properties": {
                        "name": {"type": "string"},
                        "key": {"type": "string"},
                        "optional": {"type": "boolean"},
                    },
                },
            },
        },
    },
}


def _monitor(kind: str, endpoints: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": _LABELS,
                    "annotations": _LABELS,
                },
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS},
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                            "any": {"type": "boolean"},
                        },
                    },
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor("ServiceMonitor", "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor("PodMonitor", "podMetricsEndpoints"),
}

Obj = dict[str, Any]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: the API server's strict decoding does,
    PyYAML would silently keep the last one."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml_documents(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]


@dataclass(frozen=True)
class Rendered:
    """One template's output."""

    template: str
    objects: tuple[Obj, ...]


def chart_dir(chart: str) -> Path:
    return CHARTS / chart


def scenarios(chart: str) -> list[str]:
    """The ci/*-values.yaml scenario names of a chart."""
    return sorted(
        p.name.removesuffix("-values.yaml") for p in (chart_dir(chart) / "ci").glob("*-values.yaml")
    )


def scenario_values(chart: str, scenario: str) -> dict[str, Any]:
    path = chart_dir(chart) / "ci" / f"{scenario}-values.yaml"
    values = yaml.safe_load(path.read_text()) or {}
    assert isinstance(values, dict), f"{path} is not a mapping"
    return values


def render(
    chart: str,
    values: dict[str, Any] | None = None,
    *,
    release: str | None = None,
    namespace: str = NAMESPACE,
) -> list[Rendered]:
    """Render like ``helm install --dry-run`` (the release named after the chart unless
    given); raises helm's HelmValuesError when the values break values.schema.json,
    HelmRenderError when a template fails."""
    with helm.Chart.load(chart_dir(chart)) as loaded:
        manifests = loaded.render(
            values or {}, name=release or chart, namespace=namespace, is_install=True
        )
    out = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        out.append(Rendered(template, tuple(load_yaml_documents(text))))
    return out


@contextmanager
def installed(
    chart: str,
    values: dict[str, Any],
    *,
    release: str,
    namespace: str,
    server: str,
    token: str,
    ca_file: str | None,
    timeout_s: int = 120,
) -> Iterator[dict[str, Any]]:
    """``helm install --create-namespace --wait`` of ``chart`` into the cluster at
    ``server`` (Helm's install action: its kubeVersion check, server-side apply, waiting
    until every workload is ready); the release summary. ``helm uninstall --wait`` on
    exit. Raises helm's HelmReleaseError when the install fails or times out."""
    with (
        helm.Config(
            kube_apiserver=server, kube_token=token, kube_ca_file=ca_file, namespace=namespace
        ) as config,
        helm.Chart.load(chart_dir(chart)) as loaded,
    ):
        summary = config.install(
            loaded,
            release,
            values,
            namespace=namespace,
            create_namespace=True,
            wait="watcher",
            timeout=timeout_s,
        )
        try:
            yield summary
        finally:
            config.uninstall(release, wait="watcher", timeout=timeout_s)


def merged_values(chart: str, values: dict[str, Any]) -> dict[str, Any]:
    """The chart's defaults coalesced with ``values``, as an install would use them."""
    with helm.Chart.load(chart_dir(chart)) as loaded:
        return loaded.merge_values(values)


@cache
def render_scenario(chart: str, scenario: str) -> tuple[Rendered, ...]:
    return tuple(render(chart, scenario_values(chart, scenario)))


def objects(rendered: tuple[Rendered, ...] | list[Rendered]) -> list[Obj]:
    return [obj for r in rendered for obj in r.objects]


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def kinds_and_names(objs: list[Obj]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


def validation_errors(obj: Obj) -> list[str]:
    """Every schema violation of ``obj`` in every Kubernetes version of KUBE_VERSIONS (or
    against the focused schema of a known custom resource); empty when it is valid."""
    what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    crd = CRD_SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if crd is not None:
        validator = jsonschema.Draft202012Validator(crd)
        return [
            f"{what}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)
        ]
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{what} (Kubernetes {version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{what}: {exc.message}")
    return errors


def pod_specs(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) for every Deployment, DaemonSet, StatefulSet and Job."""
    for obj in objs:
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def containers(pod: Obj, *, init: bool = True) -> list[Obj]:
    found: list[Obj] = list(pod.get("containers", []))
    if init:
        found += pod.get("initContainers", [])
    return found


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}
