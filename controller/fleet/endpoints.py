from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controller.auth.guard import ADMIN, OPERATOR, VIEWER
from controller.errors import NotFound
from controller.fleet import repository as repo
from controller.fleet import service
from controller.fleet.schemas import ClusterOut, NodeOut
from controller.web.deps import API_V1, SessionDep, SettingsDep
from controller.web.pagination import Page, PageDep

router = APIRouter(prefix=API_V1, tags=["fleet"])


@router.get("/clusters", response_model=list[ClusterOut], dependencies=[VIEWER])
def list_clusters(session: SessionDep) -> list[ClusterOut]:
    counts = repo.node_counts(session)
    return [ClusterOut.of(c, counts.get(c.id, {})) for c in repo.list_clusters(session)]


@router.get("/clusters/{name}", response_model=ClusterOut, dependencies=[VIEWER])
def get_cluster(name: str, session: SessionDep) -> ClusterOut:
    cluster = repo.get_cluster(session, name)
    if cluster is None:
        raise NotFound(f"cluster {name!r} not found")
    return ClusterOut.of(cluster, repo.node_counts(session).get(cluster.id, {}))


@router.post("/clusters/{name}/sync", response_model=ClusterOut, dependencies=[OPERATOR])
def sync_cluster(name: str, session: SessionDep, settings: SettingsDep) -> ClusterOut:
    """Re-read the cluster's nodes now (beat also does it every 5 minutes)."""
    service.resync_cluster(session, name, settings)
    cluster = repo.get_cluster(session, name)
    assert cluster is not None
    return ClusterOut.of(cluster, repo.node_counts(session).get(cluster.id, {}))


@router.get("/nodes", response_model=Page[NodeOut], dependencies=[VIEWER])
def list_nodes(
    session: SessionDep, page: PageDep, cluster: Annotated[str | None, Query()] = None
) -> Page[NodeOut]:
    rows, total = repo.list_nodes(session, cluster=cluster, limit=page.limit, offset=page.offset)
    return Page(
        items=[NodeOut.of(n, c) for n, c in rows], total=total, limit=page.limit, offset=page.offset
    )


@router.get("/clusters/{cluster}/nodes/{node}", response_model=NodeOut, dependencies=[VIEWER])
def get_node(cluster: str, node: str, session: SessionDep) -> NodeOut:
    found = repo.get_node(session, cluster, node)
    if found is None:
        raise NotFound(f"node {cluster}/{node} not found")
    return NodeOut.of(found, cluster)


@router.post("/clusters/{cluster}/nodes/{node}/reset", response_model=NodeOut, dependencies=[ADMIN])
def reset_node(cluster: str, node: str, session: SessionDep) -> NodeOut:
    """Revoke the node's agent credential so it may enrol again (a reinstalled node, or a
    credential that leaked). Its agent is refused until it enrols anew."""
    return NodeOut.of(service.reset_node(session, cluster, node), cluster)
