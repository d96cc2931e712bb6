from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.rollouts.helpers import apply, cluster_doc


@pytest.fixture
def site(client: TestClient, sim_fleet: None) -> TestClient:
    """Cluster ``site`` with nodes site-n0, site-n1, site-n2."""
    resp = apply(client, cluster_doc("site", 3))
    assert resp.status_code == 200, resp.text
    return client
