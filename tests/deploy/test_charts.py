"""What both Helm charts must hold to: rendered by Helm's own engine with their defaults
and every ci/*-values.yaml scenario, each object valid against the Kubernetes schemas of
the versions K3s fleets run, strict; pods non-root with a read-only root filesystem and
resource limits; names and labels as the style guide has them."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from tests.deploy import kube
from tests.deploy.cli import REPO
from tests.deploy.kube import CHART_NAMES, Obj

CASES = [(chart, scenario) for chart in CHART_NAMES for scenario in kube.scenarios(chart)]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kinds whose names must be DNS labels (Service, Namespace) or are used to derive pod
# names and labels (workloads), so 63 characters at most.
LABEL_NAMED = {"Service", "Namespace", "Deployment", "DaemonSet", "Job", "StatefulSet"}
STANDARD_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}
# The one container allowed to start as root: it hands a hostPath directory to the agent's
# uid, with no capability but CHOWN (edgefleet-agent, modelCache.type=hostPath).
ROOT_INIT_CONTAINERS = {"model-cache-owner"}


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


@pytest.fixture(params=CHART_NAMES)
def chart(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(params=CASES, ids=[f"{c}-{s}" for c, s in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    value: tuple[str, str] = request.param
    return value


def rendered_objects(case: tuple[str, str]) -> list[Obj]:
    return kube.objects(kube.render_scenario(*case))


def test_kubernetes_versions_cover_recent_k3s() -> None:
    assert {"1.30.0", "1.31.0", "1.32.0"} <= set(kube.KUBE_VERSIONS)


def test_chart_metadata(chart: str) -> None:
    meta = yaml.safe_load((kube.chart_dir(chart) / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == chart
    assert meta["type"] == "application"
    assert meta["appVersion"] == project_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    with helm.Chart.load(kube.chart_dir(chart)) as loaded:
        assert loaded.name == chart
        assert loaded.schema is not None, "values.schema.json"
    assert {"default", "production", "minimal"} <= set(kube.scenarios(chart))


def test_helpers_define_the_standard_names(chart: str) -> None:
    helpers = (kube.chart_dir(chart) / "templates" / "_helpers.tpl").read_text()
    for helper in ("name", "fullname", "labels", "selectorLabels"):
        assert f'define "{chart}.{helper}"' in helpers, helper
    assert "trunc 63" in helpers


def test_values_are_commented_and_match_the_schema(chart: str) -> None:
    directory = kube.chart_dir(chart)
    schema = json.loads((directory / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    text = (directory / "values.yaml").read_text()
    assert text.count("\n#") + text.count("  #") >= 20, "values.yaml explains its keys"
    # What Helm checks: the defaults coalesced with each scenario's values.
    for scenario in kube.scenarios(chart):
        values = kube.merged_values(chart, kube.scenario_values(chart, scenario))
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(values)]
        assert errors == [], scenario
    # Every top-level key of values.yaml is declared (the schema has no catch-all).
    assert schema["additionalProperties"] is False
    assert set(yaml.safe_load(text)) <= set(schema["properties"])


def test_renders_one_resource_per_template(case: tuple[str, str]) -> None:
    rendered = kube.render_scenario(*case)
    assert rendered, "nothing rendered"
    for r in rendered:
        assert len(r.objects) <= 1, f"{r.template} renders {len(r.objects)} objects"


def test_every_object_is_valid_kubernetes(case: tuple[str, str]) -> None:
    errors = [e for obj in rendered_objects(case) for e in kube.validation_errors(obj)]
    assert errors == []


def test_the_validation_is_strict() -> None:
    """An unknown field, or a wrong type, fails: the check above is not vacuous."""
    objs = rendered_objects(("edgefleet", "default"))
    api = kube.one(objs, "Deployment", "edgefleet-api")
    assert kube.validation_errors(api) == []
    deployment = json.loads(json.dumps(api))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert kube.validation_errors(deployment)
    deployment = json.loads(json.dumps(api))
    deployment["spec"]["replicas"] = "1"
    assert kube.validation_errors(deployment)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert kube.validation_errors(unknown), "an unknown kind is an error, not a pass"


@pytest.mark.parametrize("kube_version", kube.KUBE_VERSIONS)
def test_helm_lint_is_clean(case: tuple[str, str], kube_version: str) -> None:
    chart, scenario = case
    report = helm.lint(
        kube.chart_dir(chart),
        kube.scenario_values(chart, scenario),
        strict=True,
        kube_version=f"v{kube_version}",
    )
    # Severity 1 is informational ("icon is recommended"); 2 and above are findings.
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert (report["errors"], findings) == ([], [])


def test_names_and_labels(case: tuple[str, str]) -> None:
    chart, _ = case
    for obj in rendered_objects(case):
        meta = obj["metadata"]
        name = meta["name"]
        if obj["kind"] in LABEL_NAMED:
            assert DNS_LABEL.match(name), name
            assert len(name) <= 63, name
        assert set(meta["labels"]) >= STANDARD_LABELS, f"{obj['kind']}/{name}"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert meta["labels"]["app.kubernetes.io/instance"] == chart
        assert meta["labels"]["app.kubernetes.io/version"] == project_version()
        # Namespaced objects land in the release namespace, except the Role and its
        # binding, which belong in the workload namespace they govern.
        if obj["kind"] not in (
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ):
            assert meta.get("namespace") == kube.NAMESPACE, f"{obj['kind']}/{name}"
    for workload, _ in kube.pod_specs(rendered_objects(case)):
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        if workload["kind"] != "Job":  # a Job's selector is generated
            assert selector, workload["metadata"]["name"]
            assert selector.items() <= template_labels.items()
            # Minimal and immutable: no version or chart label in a selector.
            assert not {"helm.sh/chart", "app.kubernetes.io/version"} & set(selector)
            assert {"app.kubernetes.io/name", "app.kubernetes.io/instance"} <= set(selector)


def test_long_release_names_stay_within_63_characters(chart: str) -> None:
    release = "r" * 53  # Helm's own limit for a release name
    objs = kube.objects(kube.render(chart, release=release))
    seen: set[tuple[str, str]] = set()
    for obj in objs:
        name = obj["metadata"]["name"]
        if obj["kind"] in LABEL_NAMED or obj["kind"].endswith("Role") or "Binding" in obj["kind"]:
            assert len(name) <= 63, name
            assert DNS_LABEL.match(name), name
        assert (obj["kind"], name) not in seen, f"two {obj['kind']} named {name}"
        seen.add((obj["kind"], name))
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63, value


def test_pods_are_non_root_read_only_and_limited(case: tuple[str, str]) -> None:
    pods = list(kube.pod_specs(rendered_objects(case)))
    assert pods
    for workload, pod in pods:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] == 10001, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Only the agents' own tokens: the node agent's, for listing its node's inference
        # pods; the cluster agent's (pull mode), for applying the workloads.
        expected_token = case[0] == "edgefleet-agent" and (
            workload["kind"] == "DaemonSet"
            or workload["metadata"]["name"].endswith("-cluster-agent")
        )
        assert pod.get("automountServiceAccountToken") is expected_token, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in kube.containers(pod):
            what = f"{where} container {container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["capabilities"]["drop"] == ["ALL"], what
            if container["name"] in ROOT_INIT_CONTAINERS:
                assert container in pod.get("initContainers", []), what
                assert sc["capabilities"].get("add") == ["CHOWN"], what
            else:
                assert sc["runAsNonRoot"] is True, what
                assert sc.get("runAsUser", pod_sc["runAsUser"]) != 0, what
                assert "add" not in sc["capabilities"], what
                # A read-only root filesystem, and a writable /tmp from an emptyDir.
                tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert len(tmp) == 1, what
                assert "emptyDir" in volumes[tmp[0]["name"]], what
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{what}: {kind}"


def test_references_resolve(case: tuple[str, str]) -> None:
    """Every Secret, ConfigMap, claim and ServiceAccount a pod names is rendered by the
    chart or named in the values as existing beforehand."""
    chart, scenario = case
    values = kube.merged_values(chart, kube.scenario_values(chart, scenario))
    objs = rendered_objects(case)
    names = {
        kind: {o["metadata"]["name"] for o in kube.by_kind(objs, kind)}
        for kind in ("Secret", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount")
    }
    external = {
        "Secret": {
            values.get("secret", {}).get("existingSecret"),
            values.get("joinToken", {}).get("existingSecret"),
            values.get("clusterAgent", {}).get("joinToken", {}).get("existingSecret"),
        },
        "PersistentVolumeClaim": {values.get("persistence", {}).get("existingClaim")},
        "ServiceAccount": {"default", values.get("serviceAccount", {}).get("name")},
        "ConfigMap": set(),
    }
    for workload, pod in kube.pod_specs(objs):
        refs: list[tuple[str, Any]] = [("ServiceAccount", pod.get("serviceAccountName", "default"))]
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for container in kube.containers(pod):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    refs.append(("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source:
                    refs.append(("Secret", source["secretRef"]["name"]))
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    refs.append(("Secret", ref["secretKeyRef"]["name"]))
                if "configMapKeyRef" in ref:
                    refs.append(("ConfigMap", ref["configMapKeyRef"]["name"]))
        for kind, name in refs:
            assert name in names[kind] | (external[kind] - {None, ""}), (
                f"{workload['kind']}/{workload['metadata']['name']} refers to {kind} {name}"
            )


def test_schema_rejects_a_mistyped_value(chart: str) -> None:
    bad: dict[str, Any] = (
        {"api": {"replicaCount": "three"}}
        if chart == "edgefleet"
        else {"updateStrategy": {"rollingUpdate": {"maxUnavailable": "one"}}}
    )
    with pytest.raises(helm.HelmValuesError, match=r"replicaCount|maxUnavailable"):
        kube.render(chart, bad)
    with helm.Chart.load(kube.chart_dir(chart)) as loaded:
        with pytest.raises(helm.HelmValuesError):
            loaded.validate_schema(bad)
        loaded.validate_schema({})  # the defaults pass


def test_schema_rejects_an_unknown_key(chart: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="replicas"):
        kube.render(chart, {"replicas": 3})
