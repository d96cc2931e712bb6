"""helm/edgefleet-agent: the node agent DaemonSet and the RBAC the edge cluster grants the
controller's driver, rendered by Helm's engine."""

from __future__ import annotations

import helm_python as helm
import pytest

from node_agent.agent.settings import AgentSettings
from tests.deploy import kube
from tests.deploy.cli import check_command
from tests.deploy.kube import Obj

CHART = "edgefleet-agent"
WORKLOADS = "edgefleet-workloads"
CACHE = "/var/lib/edgefleet"
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
READ = {"get", "list", "watch"}
# (apiGroup, resource) -> verbs the controller's driver is granted in the workload namespace.
EXPECTED_ROLE = {
    ("apps", "deployments"): ALL_VERBS,
    ("apps", "daemonsets"): ALL_VERBS,
    ("", "pods"): READ,
    ("", "events"): READ,
    ("events.k8s.io", "events"): READ,
    # Each model's Service, the applications' endpoint on the nodes.
    ("", "services"): {"get", "list", "create", "patch", "delete"},
    # Its Endpoints: a handover ends once they route to the new version's pod.
    ("", "endpoints"): READ,
    # The inference pods' artifact token, and no other Secret.
    ("", "secrets"): {"create"},
    ("", "secrets", "edgefleet-artifact-token"): {"get", "patch"},
}
EXPECTED_CLUSTER_ROLE = {("", "nodes"): READ | {"patch"}}
# What the agent itself may do: read pods in the workload namespace (discovery).
EXPECTED_AGENT_ROLE = {("", "pods"): {"get", "list"}}
CONTROLLER_ROLE = "edgefleet-agent-controller"
AGENT_ROLE = "edgefleet-agent-agent"


def render(scenario: str) -> list[Obj]:
    return kube.objects(kube.render_scenario(CHART, scenario))


@pytest.fixture(params=kube.scenarios(CHART))
def scenario(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def daemonset(objs: list[Obj]) -> Obj:
    return kube.one(objs, "DaemonSet")


def agent_container(objs: list[Obj]) -> Obj:
    containers = kube.containers(daemonset(objs)["spec"]["template"]["spec"], init=False)
    assert len(containers) == 1
    return containers[0]


def grants(role: Obj) -> dict[tuple[str, ...], set[str]]:
    """(group, resource[, name]) -> verbs; a rule limited to named objects keys by name."""
    out: dict[tuple[str, ...], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    key = (group, resource) if name is None else (group, resource, name)
                    out.setdefault(key, set()).update(rule["verbs"])
    return out


def test_default_resources() -> None:
    assert kube.kinds_and_names(render("default")) == {
        ("DaemonSet", "edgefleet-agent"),
        ("ServiceAccount", "edgefleet-agent"),
        ("Namespace", WORKLOADS),
        ("ServiceAccount", "edgefleet-agent-controller"),
        ("Secret", "edgefleet-agent-controller-token"),
        ("Role", CONTROLLER_ROLE),
        ("RoleBinding", CONTROLLER_ROLE),
        ("Role", AGENT_ROLE),
        ("RoleBinding", AGENT_ROLE),
        ("ClusterRole", "edgefleet-agent-controller"),
        ("ClusterRoleBinding", "edgefleet-agent-controller"),
    }


def test_daemonset_rollout_and_placement(scenario: str) -> None:
    ds = daemonset(render(scenario))
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    pod = ds["spec"]["template"]["spec"]
    # Tolerate everything: an edge node runs the agent whatever its taints.
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"]["kubernetes.io/os"] == "linux"


def test_agent_environment(scenario: str) -> None:
    objs = render(scenario)
    agent = agent_container(objs)
    check_command(agent["command"])
    assert agent["command"] == ["edgefleet-agent"]
    env = kube.env_of(agent)
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["EDGEFLEET_CONTROLLER_URL"]["value"].startswith(("http://", "https://"))
    token = env["EDGEFLEET_JOIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    if values["joinToken"]["value"]:
        secret = kube.one(objs, "Secret", token["name"])
        assert token["key"] in secret["data"]
    else:
        assert token == {
            "name": values["joinToken"]["existingSecret"],
            "key": values["joinToken"]["key"],
        }
        assert [
            s for s in kube.by_kind(objs, "Secret") if s["metadata"]["name"] == token["name"]
        ] == []


def test_model_cache(scenario: str) -> None:
    objs = render(scenario)
    pod = daemonset(objs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in agent_container(objs)["volumeMounts"] if m["mountPath"] == CACHE]
    cache = volumes[mount["name"]]
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    if values["modelCache"]["type"] == "hostPath":
        assert cache["hostPath"] == {"path": CACHE, "type": "DirectoryOrCreate"}
        # The kubelet creates it root-owned; the init container hands it to uid 10001.
        (init,) = pod["initContainers"]
        assert init["name"] == "model-cache-owner"
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert "chown 10001:10001 /var/lib/edgefleet" in " ".join(init["command"])
    else:
        assert "emptyDir" in cache
        assert "initContainers" not in pod


def test_rbac_grants_exactly_what_the_driver_needs() -> None:
    objs = render("default")
    role = kube.one(objs, "Role", CONTROLLER_ROLE)
    assert role["metadata"]["namespace"] == WORKLOADS
    assert grants(role) == EXPECTED_ROLE
    cluster_role = kube.one(objs, "ClusterRole")
    assert grants(cluster_role) == EXPECTED_CLUSTER_ROLE
    controller = {
        "kind": "ServiceAccount",
        "name": "edgefleet-agent-controller",
        "namespace": kube.NAMESPACE,
    }
    binding = kube.one(objs, "RoleBinding", CONTROLLER_ROLE)
    assert binding["metadata"]["namespace"] == WORKLOADS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [controller]
    cluster_binding = kube.one(objs, "ClusterRoleBinding")
    assert cluster_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert cluster_binding["subjects"] == [controller]
    # Its token, for the controller's kubeconfig of this cluster.
    token = kube.one(objs, "Secret", "edgefleet-agent-controller-token")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert (
        token["metadata"]["annotations"]["kubernetes.io/service-account.name"] == controller["name"]
    )
    # The agent is not the controller: it gets none of the driver's rights.
    pod = daemonset(objs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] not in {s["name"] for s in binding["subjects"]}


def test_agent_reads_only_pods_of_the_workload_namespace() -> None:
    """Discovery (on by default): the agent's own identity may get and list pods where
    the inference pods run, nothing else; its token is mounted for that."""
    objs = render("default")
    pod = daemonset(objs)["spec"]["template"]["spec"]
    role = kube.one(objs, "Role", AGENT_ROLE)
    assert role["metadata"]["namespace"] == WORKLOADS
    assert grants(role) == EXPECTED_AGENT_ROLE
    binding = kube.one(objs, "RoleBinding", AGENT_ROLE)
    assert binding["metadata"]["namespace"] == WORKLOADS
    assert binding["roleRef"]["name"] == AGENT_ROLE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": kube.NAMESPACE}
    ]
    bound = {
        (b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in kube.by_kind(objs, "RoleBinding") + kube.by_kind(objs, "ClusterRoleBinding")
        if pod["serviceAccountName"] in {s["name"] for s in b["subjects"]}
    }
    assert bound == {("Role", AGENT_ROLE)}
    assert pod["automountServiceAccountToken"] is True
    env = kube.env_of(agent_container(objs))
    assert env["EDGEFLEET_DISCOVERY"]["value"] == "kubernetes"
    assert env["EDGEFLEET_WORKLOAD_NAMESPACE"]["value"] == WORKLOADS
    assert float(env["EDGEFLEET_DISCOVERY_REFRESH_S"]["value"]) == 60


def test_without_discovery_the_agent_has_no_api_access() -> None:
    objs = kube.objects(kube.render(CHART, {"discovery": {"enabled": False}}))
    pod = daemonset(objs)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert [r["metadata"]["name"] for r in kube.by_kind(objs, "Role")] == [CONTROLLER_ROLE]
    assert "EDGEFLEET_DISCOVERY" not in kube.env_of(agent_container(objs))


def test_rbac_with_a_user_identity() -> None:
    objs = render("production")
    user = {"kind": "User", "name": "edgefleet-controller", "apiGroup": "rbac.authorization.k8s.io"}
    assert kube.one(objs, "RoleBinding", CONTROLLER_ROLE)["subjects"] == [user]
    assert kube.one(objs, "ClusterRoleBinding")["subjects"] == [user]
    assert grants(kube.one(objs, "Role", CONTROLLER_ROLE)) == EXPECTED_ROLE
    assert kube.by_kind(objs, "Namespace") == []  # createWorkloadNamespace: false
    assert [
        s for s in kube.by_kind(objs, "ServiceAccount") if "controller" in s["metadata"]["name"]
    ] == []


def test_rbac_is_optional() -> None:
    objs = render("minimal")
    kinds = {kind for kind, _ in kube.kinds_and_names(objs)}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Namespace"}
    assert kinds == {"DaemonSet", "ServiceAccount", "Secret"}


def test_workload_namespace_is_kept_on_uninstall() -> None:
    namespace = kube.one(render("default"), "Namespace", WORKLOADS)
    assert namespace["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_schema_rejects_bad_settings() -> None:
    for bad in (
        {"modelCache": {"type": "nfs"}},
        {"controller": {"url": "edgefleet.example.com"}},
        {"rbac": {"extraSubjects": [{"kind": "Robot", "name": "x"}]}},
        {"tolerations": "all"},
        {"discovery": {"refreshSeconds": 0}},
        {"discovery": {"enabeld": True}},
    ):
        with pytest.raises(helm.HelmValuesError):
            kube.render(CHART, bad)


def test_agent_knows_its_cluster() -> None:
    """The agent enrolls as a node of this cluster: EDGEFLEET_CLUSTER comes from values."""
    objs = kube.objects(kube.render("edgefleet-agent", {"controller": {"clusterName": "berlin-7"}}))
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    env = {
        e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["EDGEFLEET_CLUSTER"] == "berlin-7"


CLUSTER_AGENT = "edgefleet-agent-cluster-agent"


def test_pull_mode_runs_one_cluster_agent_with_the_drivers_permissions() -> None:
    """Pull mode: one cluster agent (a Deployment), bound to exactly the driver's Role and
    ClusterRole; the controller gets no identity in the cluster."""
    objs = render("pull")
    deployment = kube.one(objs, "Deployment", CLUSTER_AGENT)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = kube.containers(pod, init=False)
    check_command(container["command"])
    assert container["command"] == ["edgefleet-cluster-agent"]
    assert "ports" not in container  # it only dials out
    env = kube.env_of(container)
    assert env["EDGEFLEET_CLUSTER"]["value"] == "shop-17"
    # The cluster's own join token, not the node agents' fleet-wide one.
    assert env["EDGEFLEET_JOIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "edgefleet-cluster-join-token",
        "key": "token",
    }
    assert env["EDGEFLEET_STATE_DIR"]["value"] == "/var/lib/edgefleet/cluster-agent"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": CLUSTER_AGENT}
    claim = kube.one(objs, "PersistentVolumeClaim", CLUSTER_AGENT)
    assert claim["spec"]["storageClassName"] == "local-path"

    # Its own selector: the agent DaemonSet's never selects its pod, nor the other way.
    ds_selector = daemonset(objs)["spec"]["selector"]["matchLabels"]
    own = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not ds_selector.items() <= labels.items()
    assert own.items() <= labels.items()

    account = {"kind": "ServiceAccount", "name": CLUSTER_AGENT, "namespace": kube.NAMESPACE}
    assert pod["serviceAccountName"] == CLUSTER_AGENT
    assert pod["automountServiceAccountToken"] is True
    bound = {
        (b["roleRef"]["kind"], b["roleRef"]["name"]): b["subjects"]
        for b in kube.by_kind(objs, "RoleBinding") + kube.by_kind(objs, "ClusterRoleBinding")
        if account in b["subjects"]
    }
    assert bound == {
        ("Role", CONTROLLER_ROLE): [account],
        ("ClusterRole", "edgefleet-agent-controller"): [account],
    }
    assert grants(kube.one(objs, "Role", CONTROLLER_ROLE)) == EXPECTED_ROLE
    assert grants(kube.one(objs, "ClusterRole")) == EXPECTED_CLUSTER_ROLE
    assert [s for s in kube.by_kind(objs, "Secret") if "controller" in s["metadata"]["name"]] == []
    assert {s["metadata"]["name"] for s in kube.by_kind(objs, "ServiceAccount")} == {
        "edgefleet-agent",
        CLUSTER_AGENT,
    }


def test_no_cluster_agent_by_default() -> None:
    objs = render("default")
    assert kube.by_kind(objs, "Deployment") == []
    assert kube.by_kind(objs, "PersistentVolumeClaim") == []
    with pytest.raises(helm.HelmValuesError):
        kube.render(CHART, {"clusterAgent": {"persistence": {"type": "nfs"}}})


def test_agent_metrics_on_the_pods_address(scenario: str) -> None:
    """The agent's /metrics (EDGEFLEET_METRICS_PORT) is bound on the pod's own IP (its
    default outside the chart is loopback), named as a container port, and found by
    Prometheus through the pod annotations or a PodMonitor; it sends no token (the
    route asks for none, docs/security.md)."""
    objs = render(scenario)
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    port = values["metrics"]["port"]
    agent = agent_container(objs)
    env = kube.env_of(agent)
    assert env["EDGEFLEET_METRICS_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    settings = AgentSettings(
        controller_url="http://controller",
        node_name="n",
        cluster="c",
        metrics_port=env["EDGEFLEET_METRICS_PORT"]["value"],
    )
    assert settings.metrics_port == port > 0
    assert AgentSettings.model_fields["metrics_host"].default == "127.0.0.1"
    assert agent["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    template = daemonset(objs)["spec"]["template"]
    annotations = template["metadata"].get("annotations", {})
    own = values["podAnnotations"]
    assert annotations["prometheus.io/scrape"] == own.get("prometheus.io/scrape", "true")
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    monitors = kube.by_kind(objs, "PodMonitor")
    if not values["metrics"]["podMonitor"]["enabled"]:
        assert monitors == []
        return
    (monitor,) = monitors
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    assert selector <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert "authorization" not in endpoint


def test_the_pod_monitor_leaves_the_cluster_agent_out() -> None:
    """Pull mode's cluster agent (a Deployment of the same release) serves no metrics."""
    values = kube.scenario_values(CHART, "pull")
    values["metrics"] = {"podMonitor": {"enabled": True}}
    objs = kube.objects(kube.render(CHART, values))
    selector = kube.one(objs, "PodMonitor")["spec"]["selector"]["matchLabels"].items()
    (deployment,) = kube.by_kind(objs, "Deployment")
    assert not selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert selector <= daemonset(objs)["spec"]["template"]["metadata"]["labels"].items()


def test_agent_metrics_can_be_off() -> None:
    objs = kube.objects(
        kube.render(CHART, {"metrics": {"port": 0, "podMonitor": {"enabled": True}}})
    )
    agent = agent_container(objs)
    assert "EDGEFLEET_METRICS_PORT" not in kube.env_of(agent)
    assert "ports" not in agent
    assert "prometheus.io/scrape" not in daemonset(objs)["spec"]["template"]["metadata"].get(
        "annotations", {}
    )
    assert kube.by_kind(objs, "PodMonitor") == []
