"""The objects of controller/kube/objects.py on their own: the handover's labels, the
DaemonSet's node affinity and drain settings, the model's Service. (Against a real API
server: test_handover.py.)"""

from __future__ import annotations

from dataclasses import replace

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from controller.kube import objects
from controller.kube.driver import WorkloadSpec
from node_agent.cluster import handover
from node_agent.serve import load_settings
from node_agent.server.settings import ServeSettings


def spec(version: str, model: str = "detector") -> WorkloadSpec:
    return WorkloadSpec(
        model=model,
        version=version,
        sha256="ab" * 32,
        format="onnx",
        artifact_url=f"http://controller/v1/models/{model}/versions/{version}/artifact",
        rollout="r",
        resources={"limits": {"cpu": "1", "memory": "512Mi"}},
    )


@pytest.mark.parametrize(
    ("wanted", "current", "previous", "serving", "room", "expected"),
    [
        # First placement: nothing to keep.
        ("2", None, None, set(), True, ("2", None)),
        # A change: the version the node leaves serves until the new one does.
        ("2", "1", None, {"1"}, True, ("2", "1")),
        ("2", "2", "1", {"1"}, True, ("2", "1")),
        # The new one is Ready: the old one goes.
        ("2", "2", "1", {"1", "2"}, True, ("2", None)),
        ("2", "2", None, {"2"}, True, ("2", None)),
        # A change in the middle of a change keeps what serves, not what still starts.
        ("3", "2", "1", {"1"}, True, ("3", "1")),
        # ... and a rollback in the middle of one returns to what serves: nothing kept.
        ("1", "2", "1", {"1"}, True, ("1", None)),
        # Nothing serves: nothing worth keeping (a crash-looping old version goes).
        ("2", "1", None, set(), True, ("2", None)),
        # Leaving the model: nothing takes the traffic over.
        (None, "1", None, {"1"}, True, (None, None)),
        (None, "2", "1", {"1"}, True, (None, None)),
        # No room for both pods: break before make.
        ("2", "2", "1", {"1"}, False, ("2", None)),
    ],
)
def test_next_labels(
    wanted: str | None,
    current: str | None,
    previous: str | None,
    serving: set[str],
    room: bool,
    expected: tuple[str | None, str | None],
) -> None:
    assert handover.next_labels(wanted, current, previous, serving, room=room) == expected


def test_each_version_selects_nodes_by_label_or_previous_label() -> None:
    pod = objects.daemonset(spec("2.0.0"), namespace="w", image="img:1", port=8500)["spec"][
        "template"
    ]["spec"]
    assert "nodeSelector" not in pod
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    # Terms are ORed: either label naming this version schedules its pod on the node.
    assert terms == [
        {
            "matchExpressions": [
                {"key": "model.edgefleet.io/detector", "operator": "In", "values": ["2.0.0"]}
            ]
        },
        {
            "matchExpressions": [
                {
                    "key": "previous.model.edgefleet.io/detector",
                    "operator": "In",
                    "values": ["2.0.0"],
                }
            ]
        },
    ]


def test_a_replaced_pod_drains_within_its_grace_period() -> None:
    pod = objects.daemonset(spec("1.0.0"), namespace="w", image="img:1", port=8500)["spec"][
        "template"
    ]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    settings = ServeSettings.model_validate(
        {
            "model_path": "m.onnx",
            "shutdown_delay_s": env[objects.SHUTDOWN_DELAY_ENV],
            "shutdown_grace_s": env[objects.SHUTDOWN_GRACE_ENV],
        }
    )
    assert settings.shutdown_delay_s == objects.SHUTDOWN_DELAY_S > 0
    assert (
        settings.shutdown_delay_s + settings.shutdown_grace_s < pod["terminationGracePeriodSeconds"]
    )


def test_the_pod_warms_up_on_the_versions_validation_hints() -> None:
    """The container's arguments, parsed by edgefleet-serve itself, carry the hints; a
    version without hints adds no argument."""
    hints = {"shapes": {"state": [2, 1, 128]}, "values": {"sr": 16000}}
    for warmup, want in ((hints, hints), ({}, {})):
        workload = replace(spec("1.0.0"), warmup_inputs=warmup)
        pod = objects.daemonset(workload, namespace="w", image="img:1", port=8500)
        args = pod["spec"]["template"]["spec"]["containers"][0]["args"]
        assert ("--warmup-inputs" in args) is bool(want)
        assert load_settings(args).warmup_inputs == want


def test_the_service_selects_every_version_of_its_model_on_the_callers_node() -> None:
    svc = objects.service("detector", namespace="w", port=8500)
    assert svc["metadata"]["name"] == "ef-detector"
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    selector = svc["spec"]["selector"]
    for version in ("1.0.0", "2.0.0"):
        ds = objects.daemonset(spec(version), namespace="w", image="img:1", port=8500)
        labels = ds["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        (port,) = ds["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    other = objects.daemonset(spec("1.0.0", "counter"), namespace="w", image="img:1", port=8500)
    assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    old_server = objects.service("detector", namespace="w", port=8500, node_local=False)
    assert "internalTrafficPolicy" not in old_server["spec"]


def test_the_pod_template_of_a_version_is_the_same_whichever_rollout_applies_it() -> None:
    """A rollback re-applies the version that serves, under the failed rollout's name: a
    pod template naming the rollout would change, and the DaemonSet would replace the
    pods the rollback keeps."""
    first = objects.daemonset(spec("1.0.0"), namespace="w", image="img:1", port=8500)
    again = replace(spec("1.0.0"), rollout="the-rollback")
    second = objects.daemonset(again, namespace="w", image="img:1", port=8500)
    assert first["spec"] == second["spec"]
    assert first["metadata"]["labels"]["edgefleet.io/rollout"] == "r"
    assert second["metadata"]["labels"]["edgefleet.io/rollout"] == "the-rollback"


def test_service_names_are_dns_1035_labels() -> None:
    long = "a" * 63
    name = objects.service_name(long)
    assert len(name) <= 63
    assert name[0].isalpha()
    assert name != objects.service_name("a" * 62)
    assert objects.service_name("9lives")[0].isalpha()


def test_objects_validate_against_kubernetes_schemas() -> None:
    for version in ("1.30.0", "1.31.0", "1.32.0"):
        for obj in (
            objects.service("detector", namespace="w", port=8500),
            objects.daemonset(spec("1.0.0"), namespace="w", image="img:1", port=8500),
        ):
            kubernetes_validate.validate(obj, version, strict=True)
