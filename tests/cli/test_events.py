"""``GET /v1/events``, ``edgefleet events KIND/NAME`` and ``describe cluster|node``: the audit
log and details of clusters,
nodes, model versions and rollouts, for a viewer."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from controller.api.app import create_app
from controller.settings import Settings
from tests.cli.test_rollouts import cli, data
from tests.conftest import bearer
from tests.live import serve
from tests.rollouts.helpers import apply, cluster_doc, push_versions


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None) -> TestClient:
    assert apply(client, cluster_doc("berlin", 2)).status_code == 200
    push_versions(client, "1.0.0")
    return client


def test_events_of_a_cluster_node_and_model_version(fleet: TestClient) -> None:
    viewer = bearer("viewer")
    cluster = fleet.get("/v1/events", params={"kind": "Cluster", "name": "berlin"}, headers=viewer)
    assert cluster.status_code == 200, cluster.text
    assert "Applied" in [e["reason"] for e in cluster.json()]
    version = fleet.get(
        "/v1/events", params={"kind": "ModelVersion", "name": "detector:1.0.0"}, headers=viewer
    )
    assert version.status_code == 200
    assert version.json()[0]["reason"] in ("Validated", "ValidationFailed")  # the newest
    nobody = fleet.get("/v1/events", params={"kind": "Cluster", "name": "nowhere"})
    assert nobody.json() == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"kind": "ApiToken", "name": "x"}, "kind"),
        ({"kind": "cluster", "name": "berlin"}, "kind"),
        ({"kind": "Cluster", "name": ""}, "name"),
        ({"kind": "Cluster", "name": "x" * 254}, "name"),
        ({"kind": "Cluster", "name": "berlin", "limit": 0}, "limit"),
        ({"kind": "Cluster"}, "name"),
        ({"kind": "Cluster", "name": "berlin", "after": -1}, "after"),
    ],
)
def test_bad_queries_are_422_naming_the_parameter(
    client: TestClient, params: dict[str, object], field: str
) -> None:
    resp = client.get("/v1/events", params=params)
    assert resp.status_code == 422, resp.text
    assert field in json.dumps(resp.json())


@pytest.fixture
def api_url(
    settings: Settings, connection: Connection, redis_available: None, fleet: TestClient
) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def test_cli_shows_the_events_oldest_first(api_url: str) -> None:
    result = cli(api_url, "events", "cluster/berlin")
    assert result.exit_code == 0, result.output
    assert "Applied" in result.stdout
    data = json.loads(cli(api_url, "events", "model/detector:1.0.0", "-o", "json").stdout)
    assert data
    assert [e["id"] for e in data] == sorted(e["id"] for e in data)  # oldest first


def test_watch_follows_new_events_until_ctrl_c(api_url: str, fleet: TestClient) -> None:
    """As a user would: the list, then an event recorded after the watch started shows
    up, and Ctrl-C ends the watch cleanly."""
    command = ("events", "cluster/berlin", "--watch", "--interval", "0.5")
    watch = subprocess.Popen(
        [sys.executable, "-m", "controller.cli.main", *command],
        # A watch that ignores Ctrl-C is aborted below: the stacks faulthandler prints
        # then say where it hung.
        env=os.environ
        | {"EDGEFLEET_API_URL": api_url, "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"},
        # As a terminal starts it: with Ctrl-C's default action. A process started in
        # the background by a shell without job control (as CI may start the suite)
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: the
        # watch slept through Ctrl-C in its poll loop (events.py _follow, its sleep).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []  # drained as written: a full pipe would block the watch

    def read() -> None:
        for line in watch.stdout or ():
            lines.put(line)

    def read_errors() -> None:
        errors.extend(watch.stderr or ())

    readers = [threading.Thread(target=read), threading.Thread(target=read_errors)]
    for reader in readers:
        reader.start()

    def next_line_with(text: str) -> str:
        while True:
            line = lines.get(timeout=30)
            if text in line:
                return line

    try:
        assert next_line_with("REASON").split()[:2] == ["AGE", "REASON"]
        assert "created (generation 1)" in next_line_with("Applied")
        assert apply(fleet, cluster_doc("berlin", 3)).status_code == 200
        assert "configured (generation 2)" in next_line_with("Applied")
        watch.send_signal(signal.SIGINT)
        try:
            code = watch.wait(15)
        except subprocess.TimeoutExpired:
            watch.send_signal(signal.SIGABRT)
            watch.wait(15)
            readers[1].join(10)
            pytest.fail(f"the watch ignored Ctrl-C for 15 s:\n{''.join(errors)[-6000:]}")
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        for reader in readers:
            reader.join(10)
    assert code == 0, "".join(errors)
    assert "Traceback" not in "".join(errors)


def test_events_after_a_cursor_are_oldest_first(fleet: TestClient) -> None:
    viewer = bearer("viewer")
    query = {"kind": "Cluster", "name": "berlin"}
    first = fleet.get("/v1/events", params=query, headers=viewer).json()[0]  # the newest
    assert fleet.get("/v1/events", params=query | {"after": first["id"]}).json() == []
    assert apply(fleet, cluster_doc("berlin", 3)).status_code == 200
    assert apply(fleet, cluster_doc("berlin", 4)).status_code == 200
    after = fleet.get("/v1/events", params=query | {"after": first["id"]}, headers=viewer).json()
    assert [e["id"] for e in after] == sorted(e["id"] for e in after)
    assert [e["message"] for e in after if e["reason"] == "Applied"] == [
        "configured (generation 2)",
        "configured (generation 3)",
    ]
    one = fleet.get("/v1/events", params=query | {"after": first["id"], "limit": 1}).json()
    assert [e["id"] for e in one] == [after[0]["id"]]


def test_cli_refuses_a_target_that_is_not_kind_slash_name(api_url: str) -> None:
    result = cli(api_url, "events", "berlin")
    assert result.exit_code == 1
    assert "is not KIND/NAME" in result.output


def test_describe_cluster_and_node(api_url: str) -> None:
    result = cli(api_url, "describe", "cluster", "berlin")
    assert result.exit_code == 0, result.output
    lines = [line.split(":", 1) for line in result.stdout.splitlines() if ":" in line]
    fields = {k.strip(): v.strip() for k, v in lines}
    assert fields["Driver"] == "simulated"
    assert fields["Nodes"].startswith("2 (")
    assert "Applied" in result.stdout  # its events
    node = data(api_url, "describe", "node", "berlin/berlin-n0")
    assert (node["cluster"], node["name"]) == ("berlin", "berlin-n0")
    assert isinstance(node["events"], list)
    result = cli(api_url, "describe", "node", "berlin/berlin-n0")
    assert result.exit_code == 0, result.output
    assert "Health:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("describe", "node", "berlin-n0"), "is not CLUSTER/NODE"),
        (("describe", "node", "berlin/nowhere"), "node berlin/nowhere not found"),
        (("describe", "cluster", "nowhere"), "cluster 'nowhere' not found"),
    ],
)
def test_describe_names_what_is_missing(api_url: str, args: tuple[str, ...], message: str) -> None:
    result = cli(api_url, *args)
    assert result.exit_code == 1
    assert message in result.output


def test_get_node_route(fleet: TestClient) -> None:
    resp = fleet.get("/v1/clusters/berlin/nodes/berlin-n1", headers=bearer("viewer"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == "berlin-n1"
    assert fleet.get("/v1/clusters/berlin/nodes/none").status_code == 404
