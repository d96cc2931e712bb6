from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from controller.settings import Settings
from tests.rollouts.helpers import apply, cluster_doc

JOIN_TOKEN = "join-0123456789abcdef"


@pytest.fixture
def join_token(settings: Settings) -> Iterator[str]:
    """Enrolment on, for this test only (the settings object is shared by the session)."""
    saved = settings.agent_join_token
    settings.agent_join_token = SecretStr(JOIN_TOKEN)
    try:
        yield JOIN_TOKEN
    finally:
        settings.agent_join_token = saved


@pytest.fixture
def site(client: TestClient, sim_fleet: None) -> TestClient:
    """Cluster ``site`` with nodes site-n0, site-n1, site-n2."""
    resp = apply(client, cluster_doc("site", 3))
    assert resp.status_code == 200, resp.text
    return client
