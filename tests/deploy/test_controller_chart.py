"""helm/edgefleet: the control plane chart, rendered by Helm's engine."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.settings import DEV_SECRET, Settings
from controller.tasks.celery_app import LIVENESS_FILE_NAME, LIVENESS_INTERVAL_S
from tests.deploy import kube
from tests.deploy.cli import check_command, keepalive_settings
from tests.deploy.kube import Obj

CHART = "edgefleet"
HOOK = "pre-install,pre-upgrade"
API_PORT = Settings.model_fields["api_port"].default


def render(scenario: str) -> list[Obj]:
    return kube.objects(kube.render_scenario(CHART, scenario))


@pytest.fixture(params=kube.scenarios(CHART))
def scenario(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def container(objs: list[Obj], kind: str, name: str) -> Obj:
    pod = kube.one(objs, kind, name)["spec"]["template"]["spec"]
    containers = kube.containers(pod, init=False)
    assert len(containers) == 1
    return containers[0]


def test_default_resources() -> None:
    assert kube.kinds_and_names(render("default")) == {
        ("Deployment", "edgefleet-api"),
        ("Deployment", "edgefleet-worker"),
        ("Deployment", "edgefleet-beat"),
        ("Job", "edgefleet-migrations"),
        ("Secret", "edgefleet-migrations"),
        ("Secret", "edgefleet"),
        ("ConfigMap", "edgefleet"),
        ("Service", "edgefleet"),
        ("ServiceAccount", "edgefleet"),
        ("PersistentVolumeClaim", "edgefleet-artifacts"),
    }


def test_production_resources() -> None:
    """existingSecret: the chart creates no Secret at all, not even the hook copy; the
    ServiceMonitor is on; the store is ReadWriteMany."""
    objs = render("production")
    assert kube.by_kind(objs, "Secret") == []
    monitor = kube.one(objs, "ServiceMonitor", "edgefleet")
    service = kube.one(objs, "Service", "edgefleet")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # /metrics wants a viewer token: the scrape sends one from a Secret.
    assert monitor["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "edgefleet-prometheus-token", "key": "token"},
    }
    config = kube.one(objs, "ConfigMap")["data"]
    assert config["EDGEFLEET_METRICS_PUBLIC"] == "false"
    assert config["EDGEFLEET_PUBLIC_URL"] == "https://edgefleet.example.com"
    assert config["EDGEFLEET_DATABASE_POOL_SIZE"] == "20"  # extraEnv overrides
    pvc = kube.one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "longhorn"
    for name in ("api", "worker", "beat"):
        env = kube.env_of(container(objs, "Deployment", f"edgefleet-{name}"))
        assert env["EDGEFLEET_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "edgefleet-prod",
            "key": "database-url",
        }
    job_env = kube.env_of(container(objs, "Job", "edgefleet-migrations"))
    assert job_env["EDGEFLEET_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "edgefleet-prod"
    image = container(objs, "Deployment", "edgefleet-api")["image"]
    assert image.startswith("registry.example.com/platform/edgefleet-controller@sha256:")


def test_minimal_resources() -> None:
    objs = render("minimal")
    kinds = {kind for kind, _ in kube.kinds_and_names(objs)}
    assert "ServiceAccount" not in kinds
    assert "PersistentVolumeClaim" not in kinds  # an existing claim
    assert "ServiceMonitor" not in kinds
    for name in ("api", "worker"):
        pod = kube.one(objs, "Deployment", f"edgefleet-cp-{name}")["spec"]["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["edgefleet-artifacts"]
        assert pod["serviceAccountName"] == "default"


def test_api_probes(scenario: str) -> None:
    objs = render(scenario)
    api = next(
        c for _, pod in kube.pod_specs(objs) for c in pod["containers"] if c["name"] == "api"
    )
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": API_PORT}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # A short database outage must not restart every replica at once.
    assert api["livenessProbe"]["failureThreshold"] * api["livenessProbe"]["periodSeconds"] >= 60
    service = kube.one(objs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_beat_is_a_singleton_replaced_with_recreate(scenario: str) -> None:
    beats = [
        w for w, _ in kube.pod_specs(render(scenario)) if w["metadata"]["name"].endswith("-beat")
    ]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"] == {"type": "Recreate"}


def test_commands_are_cli_commands(scenario: str) -> None:
    commands = {}
    for workload, pod in kube.pod_specs(render(scenario)):
        for c in kube.containers(pod):
            check_command(c["command"])
            commands[workload["metadata"]["name"].rsplit("-", 1)[-1]] = c["command"]
    assert commands["migrations"] == ["edgefleet", "db", "upgrade"]
    assert commands["api"][:2] == ["edgefleet", "server"]
    assert commands["api"][commands["api"].index("--port") + 1] == str(API_PORT)
    assert commands["worker"][:2] == ["edgefleet", "worker"]
    assert commands["beat"] == ["edgefleet", "beat"]


def test_migration_hook_runs_first_and_stands_alone(scenario: str) -> None:
    """A pre-install hook runs before the release's own resources exist: the Job may only
    use what exists by then (its own hook Secret, created just before it, or the existing
    Secret), and no ServiceAccount the chart is about to create."""
    objs = render(scenario)
    job = kube.one(objs, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == HOOK
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    created_accounts = {o["metadata"]["name"] for o in kube.by_kind(objs, "ServiceAccount")}
    assert pod["serviceAccountName"] not in created_accounts
    (migrate,) = pod["containers"]
    assert "envFrom" not in migrate  # the ConfigMap does not exist yet
    hooks = {
        o["metadata"]["name"]: o
        for o in kube.by_kind(objs, "Secret")
        if o["metadata"].get("annotations", {}).get("helm.sh/hook") == HOOK
    }
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    for env in migrate["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        if values["secret"]["existingSecret"]:
            assert ref["name"] == values["secret"]["existingSecret"]
            continue
        hook = hooks[ref["name"]]
        weight = int(hook["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert weight < int(annotations["helm.sh/hook-weight"]), "the Secret comes first"
        assert ref["key"] in hook["data"]
        assert "hook-succeeded" in hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    # No resource of the release but the hooks is a hook.
    for obj in objs:
        if obj is not job and obj["metadata"]["name"] not in hooks:
            assert "helm.sh/hook" not in obj["metadata"].get("annotations", {}), obj["metadata"][
                "name"
            ]


def _decoded(secret: Obj) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_generated_secret_key_is_shared_with_the_migration() -> None:
    objs = render("default")
    main = _decoded(kube.one(objs, "Secret", "edgefleet"))
    hook = _decoded(kube.one(objs, "Secret", "edgefleet-migrations"))
    key = main["EDGEFLEET_SECRET_KEY"]
    assert len(key) == 48
    assert key != DEV_SECRET
    assert hook["EDGEFLEET_SECRET_KEY"] == key
    assert hook["EDGEFLEET_DATABASE_URL"] == main["EDGEFLEET_DATABASE_URL"]
    assert "EDGEFLEET_REDIS_URL" not in hook  # only what the migration needs


def test_configuration_is_what_the_controller_reads(scenario: str) -> None:
    """Every ConfigMap key is a Settings field (pydantic would silently ignore a typo),
    and with the Secret's values the whole set passes Settings' validation, including the
    refusal of the default secret in production."""
    objs = render(scenario)
    config = kube.one(objs, "ConfigMap")["data"]
    fields = set(Settings.model_fields)
    assert [k for k in config if k.removeprefix("EDGEFLEET_").lower() not in fields] == []
    assert config["EDGEFLEET_API_PORT"] == str(API_PORT)
    secrets = [
        s
        for s in kube.by_kind(objs, "Secret")
        if "helm.sh/hook" not in s["metadata"].get("annotations", {})
    ]
    env: dict[str, Any] = dict(config)
    if secrets:
        env.update(_decoded(secrets[0]))
    else:  # production: an existing Secret, here a stand-in
        env.update({"EDGEFLEET_SECRET_KEY": "from-the-existing-secret"})
    kwargs = {k.removeprefix("EDGEFLEET_").lower(): v for k, v in env.items()}
    settings = Settings(_env_file=None, **kwargs)
    assert settings.environment == "production"
    assert str(settings.artifact_dir) == "/var/lib/edgefleet/artifacts"
    with pytest.raises(ValueError, match="EDGEFLEET_SECRET_KEY"):
        Settings(_env_file=None, **{**kwargs, "secret_key": DEV_SECRET})


def test_api_keeps_agent_connections_open(scenario: str) -> None:
    """The API pods' idle-connection timeout (api.keepAliveTimeoutS, in the ConfigMap as
    EDGEFLEET_API_KEEPALIVE_TIMEOUT_S, which `edgefleet server` hands uvicorn) outlasts
    the agents' heartbeat interval, so an agent keeps its connection between heartbeats
    instead of a TCP (and TLS) handshake each time, and a proxy's usual 60 s idle timeout."""
    objs = render(scenario)
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    config = kube.one(objs, "ConfigMap")["data"]
    assert config["EDGEFLEET_API_KEEPALIVE_TIMEOUT_S"] == str(values["api"]["keepAliveTimeoutS"])
    settings = keepalive_settings(config)
    assert settings.api_keepalive_timeout_s > settings.agent_heartbeat_interval_s
    assert settings.api_keepalive_timeout_s > 60
    # The API container runs the server with that ConfigMap as its environment.
    (api,) = [
        c for _, pod in kube.pod_specs(objs) for c in kube.containers(pod) if c["name"] == "api"
    ]
    assert api["command"][:2] == ["edgefleet", "server"]
    config_name = kube.one(objs, "ConfigMap")["metadata"]["name"]
    assert {"configMapRef": {"name": config_name}} in api["envFrom"]
    # A value of one's own goes through, rendered as the integer it is.
    custom = kube.objects(kube.render(CHART, {"api": {"keepAliveTimeoutS": 620}}))
    assert kube.one(custom, "ConfigMap")["data"]["EDGEFLEET_API_KEEPALIVE_TIMEOUT_S"] == "620"


def test_api_and_workers_share_the_artifact_store(scenario: str) -> None:
    objs = render(scenario)
    artifact_dir = kube.one(objs, "ConfigMap")["data"]["EDGEFLEET_ARTIFACT_DIR"]
    claims = set()
    for workload, pod in kube.pod_specs(objs):
        name = workload["metadata"]["name"]
        if not name.endswith(("-api", "-worker")):
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [
            m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == artifact_dir
        ]
        claims.add(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1


def test_pods_roll_when_the_configuration_changes() -> None:
    def checksum(values: dict[str, Any]) -> str:
        objs = kube.objects(kube.render(CHART, values))
        annotations: dict[str, str] = kube.one(objs, "Deployment", "edgefleet-worker")["spec"][
            "template"
        ]["metadata"]["annotations"]
        return annotations["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"benchmarkRuns": 7}})


def test_keeps_the_artifact_claim_on_uninstall() -> None:
    pvc = kube.one(render("default"), "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_schema_rejects_bad_settings() -> None:
    import helm_python as helm

    for bad in (
        {"config": {"environment": "prod"}},
        {"secret": {"databaseUrl": "mysql://x"}},
        {"persistence": {"accessModes": ["ReadWriteSometimes"]}},
        {"api": {"replicaCount": -1}},
        {"api": {"keepAliveTimeoutS": 0}},
        {"api": {"keepAliveTimeoutS": "75s"}},
        {"worker": {"livenessProbe": {"maxAgeSeconds": 5}}},  # below the touch interval
    ):
        with pytest.raises(helm.HelmValuesError):
            kube.render(CHART, bad)


def worker_liveness_command(objs: list[Obj], file: Path) -> list[str]:
    """The worker's liveness probe command as the chart renders it, run by this
    interpreter and reading ``file`` instead of the pod's /tmp one."""
    (worker,) = [
        c for _, pod in kube.pod_specs(objs) for c in pod["containers"] if c["name"] == "worker"
    ]
    command: list[str] = worker["livenessProbe"]["exec"]["command"]
    in_pod = f"/tmp/{LIVENESS_FILE_NAME}"
    assert command[0] == "python"
    assert f'"{in_pod}"' in command[-1]
    return [sys.executable, *command[1:-1], command[-1].replace(in_pod, str(file))]


def probe_passes(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


def test_worker_liveness_probe(scenario: str, tmp_path: Path) -> None:
    """The worker's probe reads the file the worker touches (LivenessFile), on the
    writable /tmp volume; it passes on a fresh file and fails on a stale or missing one
    (run here, as the kubelet would); and it is lenient enough that only a hang of
    minutes restarts a worker."""
    objs = render(scenario)
    (worker,) = [
        c for _, pod in kube.pod_specs(objs) for c in pod["containers"] if c["name"] == "worker"
    ]
    probe = worker["livenessProbe"]
    assert probe["exec"]["command"][:2] == ["python", "-c"]
    assert {"name": "tmp", "mountPath": "/tmp"} in worker["volumeMounts"]
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    max_age = values["worker"]["livenessProbe"]["maxAgeSeconds"]
    assert max_age >= 3 * LIVENESS_INTERVAL_S
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60
    assert probe["timeoutSeconds"] >= 5

    file = tmp_path / LIVENESS_FILE_NAME
    command = worker_liveness_command(objs, file)
    assert not probe_passes(command), "no file: the worker has not started"
    file.touch()
    assert probe_passes(command)
    stale = time.time() - max_age - 5
    os.utime(file, (stale, stale))
    assert not probe_passes(command)


def _workload(objs: list[Obj], component: str) -> Obj:
    (found,) = [
        o
        for o in kube.by_kind(objs, "Deployment")
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return found


def test_workers_export_their_metrics(scenario: str) -> None:
    """Each worker serves its counters on worker.metricsPort (EDGEFLEET_WORKER_METRICS_PORT
    from the ConfigMap, bound on the pod's address); with the ServiceMonitor on, a
    PodMonitor scrapes exactly the worker pods there, with the API's token."""
    objs = render(scenario)
    values = kube.merged_values(CHART, kube.scenario_values(CHART, scenario))
    port = values["worker"]["metricsPort"]
    config = kube.one(objs, "ConfigMap")["data"]
    settings = Settings(
        _env_file=None,
        worker_metrics_port=config["EDGEFLEET_WORKER_METRICS_PORT"],
        worker_metrics_host=config["EDGEFLEET_WORKER_METRICS_HOST"],
    )
    assert settings.worker_metrics_port == port > 0
    assert settings.worker_metrics_host == "0.0.0.0"
    worker = _workload(objs, "worker")
    (box,) = worker["spec"]["template"]["spec"]["containers"]
    assert box["command"][:2] == ["edgefleet", "worker"]
    assert box["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    monitors = kube.by_kind(objs, "PodMonitor")
    if not values["metrics"]["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    (monitor,) = monitors
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    assert selector <= worker["spec"]["template"]["metadata"]["labels"].items()
    for other in ("api", "beat"):  # the API's /metrics is the ServiceMonitor's
        labels = _workload(objs, other)["spec"]["template"]["metadata"]["labels"]
        assert not selector <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    service_monitor = kube.one(objs, "ServiceMonitor")
    assert endpoint["authorization"] == service_monitor["spec"]["endpoints"][0]["authorization"]
    assert monitor["metadata"]["labels"].items() >= {"release": "kube-prometheus-stack"}.items()


def test_worker_metrics_can_be_off() -> None:
    values = {"worker": {"metricsPort": 0}, "metrics": {"serviceMonitor": {"enabled": True}}}
    objs = kube.objects(kube.render(CHART, values))
    assert kube.one(objs, "ConfigMap")["data"]["EDGEFLEET_WORKER_METRICS_PORT"] == "0"
    assert Settings(_env_file=None, worker_metrics_port=0).worker_metrics_port == 0
    (box,) = _workload(objs, "worker")["spec"]["template"]["spec"]["containers"]
    assert "ports" not in box
    assert kube.by_kind(objs, "PodMonitor") == []
    assert kube.by_kind(objs, "ServiceMonitor") != []
