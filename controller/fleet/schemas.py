from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from controller.db.models import Cluster, Node


class ClusterOut(BaseModel):
    """Credentials are never returned: only whether the cluster has them."""

    name: str
    driver: str
    mode: str
    generation: int
    labels: dict[str, Any]
    server: str | None
    namespace: str | None
    has_credentials: bool
    status: str
    message: str | None
    nodes: dict[str, int]
    last_sync_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, c: Cluster, nodes: dict[str, int]) -> ClusterOut:
        return cls(
            name=c.name,
            driver=c.driver,
            mode=c.spec.get("mode", "push"),
            generation=c.generation,
            labels=c.labels,
            server=c.api_server,
            namespace=c.spec.get("namespace"),
            has_credentials=c.credentials is not None,
            status=c.status,
            message=c.message,
            nodes=nodes,
            last_sync_at=c.last_sync_at,
            created_at=c.created_at,
        )


class NodeOut(BaseModel):
    cluster: str
    name: str
    health: str
    architecture: str | None
    labels: dict[str, Any]
    allocatable: dict[str, Any]
    runtimes: list[Any]
    last_heartbeat_at: datetime | None

    @classmethod
    def of(cls, n: Node, cluster: str) -> NodeOut:
        return cls(
            cluster=cluster,
            name=n.name,
            health=n.health,
            architecture=n.architecture,
            labels=n.labels,
            allocatable=n.allocatable,
            runtimes=n.runtimes,
            last_heartbeat_at=n.last_heartbeat_at,
        )


class JoinTokenIn(BaseModel):
    expires: str | None = Field(
        None,
        max_length=32,
        description="Lifetime as a duration, 1m to 7d (default 24h); the token is also "
        "used up by its first enrolment.",
    )


class JoinTokenOut(BaseModel):
    """The join token is in this answer only: the controller keeps its sha256."""

    cluster: str
    token: str
    expires_at: datetime
