"""controller/faults.py: parsing, the registry of points against the source, and the
``raise`` action in-process (the process-killing actions are in
tests/rollouts/test_faults.py, on real worker and API processes)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import faults
from controller.db.models import ModelVersion, Node
from controller.db.session import session_scope
from controller.fleet.service import ingest_heartbeats
from controller.registry import samples
from controller.registry.service import push_version
from controller.registry.store import artifact_store
from controller.settings import Settings
from node_agent.contract import Heartbeat
from tests.rollouts.helpers import apply, cluster_doc

ROOT = Path(__file__).resolve().parent.parent


def calls_in_source() -> list[tuple[str, str]]:
    """(point name, file) of every faults.point / faults.on_commit call in controller/."""
    found = []
    for path in sorted((ROOT / "controller").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "faults"
                and node.func.attr in ("point", "on_commit")
            ):
                arg = node.args[-1]
                assert isinstance(arg, ast.Constant), f"{path}: a fault point's name is a literal"
                found.append((str(arg.value), str(path.relative_to(ROOT))))
    return found


def test_every_point_is_registered_documented_and_placed_once() -> None:
    calls = calls_in_source()
    names = [name for name, _ in calls]
    assert sorted(names) == sorted(faults.POINTS), "POINTS and the calls in the source differ"
    doc = faults.__doc__ or ""
    for name, path in calls:
        assert faults.POINTS[name].startswith(path), (name, path)
        assert f"    {name} " in doc, f"{name} is missing from the module's table"
    assert len(faults.POINTS) >= 20


def test_parse() -> None:
    armed = faults.parse(" rollout.wave.started=2*kill, registry.push.staged=raise ,")
    assert {k: (v.action, v.from_hit) for k, v in armed.items()} == {
        "rollout.wave.started": ("kill", 2),
        "registry.push.staged": ("raise", 1),
    }
    assert faults.parse("") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rollout.wave.startd=kill", "unknown fault point 'rollout.wave.startd'"),
        ("rollout.wave.started=explode", "unknown action 'explode'"),
        ("rollout.wave.started=0*kill", "1 or more"),
        ("rollout.wave.started=x*kill", "1 or more"),
        ("rollout.wave.started", "is not name=[N*]action"),
    ],
)
def test_a_bad_spec_is_refused(spec: str, message: str) -> None:
    with pytest.raises(faults.FaultSpecError, match=re.escape(message)):
        faults.parse(spec)


def test_a_misspelt_point_stops_the_process_at_startup() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import controller.rollouts.service"],
        env={**os.environ, faults.ENV: "rollout.wave.strated=kill"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "unknown fault point 'rollout.wave.strated'" in done.stderr


def test_off_by_default_and_raise_from_the_nth_hit() -> None:
    assert faults._armed == {}  # the suite runs with no fault armed
    faults.point("rollout.failed")  # nothing
    with faults.armed("rollout.failed=3*raise"):
        faults.point("rollout.failed")
        faults.point("rollout.wave.started")  # not armed
        faults.point("rollout.failed")
        with pytest.raises(faults.FaultInjected, match=r"rollout\.failed"):
            faults.point("rollout.failed")
        with pytest.raises(faults.FaultInjected):
            faults.point("rollout.failed")
    faults.point("rollout.failed")


def test_a_heartbeat_ingest_that_fails_at_its_point_stores_nothing(
    client: TestClient, sim_fleet: None
) -> None:
    apply(client, cluster_doc("site", 1))
    beat = Heartbeat(cluster="site", node="site-n0", seq=7, sent_at=datetime.now(UTC))
    with (
        faults.armed("fleet.heartbeat.folded=raise"),
        pytest.raises(faults.FaultInjected),
        session_scope() as s,
    ):
        ingest_heartbeats(s, [beat])
    with session_scope() as s:
        assert s.scalar(select(Node.last_seq).where(Node.name == "site-n0")) == 0
        ingest_heartbeats(s, [beat])  # the agent sends it again: it lands
    with session_scope() as s:
        assert s.scalar(select(Node.last_seq).where(Node.name == "site-n0")) == 7


def test_a_push_that_fails_before_promote_leaves_no_version_and_no_artifact(
    session: Session, settings: Settings, artifact_files: set[Path]
) -> None:
    nested = session.begin_nested()
    with faults.armed("registry.push.before_promote=raise"), pytest.raises(faults.FaultInjected):
        push_version(
            session,
            artifact_store(settings),
            name="faulty",
            version="1",
            chunks=[samples.build_cnn()],
            metadata={},
        )
    nested.rollback()
    assert session.scalar(select(ModelVersion).where(ModelVersion.version == "1")) is None
    root = settings.artifact_dir
    files = {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    assert files == {p for p in artifact_files if p.is_file()}  # the staged copy is gone
