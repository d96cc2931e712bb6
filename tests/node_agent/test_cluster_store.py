"""node_agent/cluster/store.py: the cluster agent's credential and last desired state on
disk, private to its user and never half-written."""

from __future__ import annotations

import stat
from pathlib import Path

from node_agent.cluster.contract import DesiredState
from node_agent.cluster.store import Store


def state(revision: int) -> DesiredState:
    return DesiredState(
        cluster="edge",
        revision=revision,
        changed=True,
        namespace="ns",
        secret={"kind": "Secret", "metadata": {"name": "s", "namespace": "ns"}},
        daemonsets=[],
        node_labels={"n1": {"model.edgefleet.io/m": "1"}},
        poll_timeout_s=25,
    )


def test_round_trip_and_private_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    assert store.credential() is None
    assert store.desired() is None
    store.save_credential("efc_secret")
    store.save_desired(state(3))
    again = Store(tmp_path / "state")  # a restarted agent
    assert again.credential() == "efc_secret"
    assert again.desired() == state(3)
    for name in ("credential", "desired.json"):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "credential",
        "desired.json",
    ]  # no temporary file left behind
    again.save_credential(None)
    assert again.credential() is None


def test_an_unreadable_state_is_ignored_not_fatal(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "desired.json").write_text('{"cluster": "edge", "revis')
    assert store.desired() is None  # the next poll, without a revision, brings it all
