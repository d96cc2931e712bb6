"""Who may call what: every route declares its caller, anonymous calls are refused,
roles are enforced, tokens are hashed, expire and are revoked, and every mutating call
records its actor."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from controller.api.app import create_app
from controller.api.worker_metrics import create_exporter_app
from controller.auth.service import hash_token
from controller.crypto import mint_artifact_token, verify_artifact_token
from controller.db.base import utcnow
from controller.db.models import ApiToken, Event
from controller.db.session import get_engine, session_scope
from controller.settings import Settings
from tests.conftest import TOKENS, bearer
from tests.rollouts.helpers import apply, cluster_doc, drive, push_versions, rollout_doc

NO_TOKEN = {"Authorization": ""}

# Routes without a bearer requirement, each for a reason a reader can check.
OPEN = {
    ("GET", "/healthz"): "liveness, for kubelets and load balancers",
    ("GET", "/readyz"): "readiness, for kubelets and load balancers",
    ("POST", "/v1/agents/enroll"): "authenticated by the join token in its body",
    (
        "POST",
        "/v1/clusters/{name}/pull/enroll",
    ): "authenticated by the cluster's join token in its body",
    ("GET", "/login"): "the dashboard's sign-in form",
    ("POST", "/login"): "turns a valid token into a session cookie",
    ("POST", "/logout"): "clears the session cookie",
}
SCHEMES = {"ApiToken", "NodeCredential", "ClusterCredential", "ArtifactAccess", "DashboardSession"}


def operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    doc = client.get("/openapi.json").json()
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
    ]


def test_every_operation_in_the_openapi_document_declares_its_caller(client: TestClient) -> None:
    ops = operations(client)
    assert len(ops) > 25
    undeclared = []
    for method, path, op in ops:
        if (method, path) in OPEN:
            continue
        requirements = op.get("security") or []
        schemes = {name for req in requirements for name in req}
        if not schemes or not schemes <= SCHEMES:
            undeclared.append(f"{method} {path}")
            continue
        for req in requirements:
            # An API-token route names its least role as the scope.
            if set(req) == {"ApiToken"} and req["ApiToken"] not in (
                ["viewer"],
                ["operator"],
                ["admin"],
            ):
                undeclared.append(f"{method} {path}: ApiToken scope {req['ApiToken']}")
    assert undeclared == []


def test_routes_outside_the_openapi_document_declare_their_caller_too(settings: Settings) -> None:
    app = create_app(settings)
    missing = []
    routes = list(api_routes(app.routes))
    assert len(routes) > 25
    assert {"/", "/metrics"} <= {r.path for r in routes}
    for route in routes:
        for method in route.methods or ():
            if (method, route.path) in OPEN:
                continue
            # A security scheme (bearer, cookie) somewhere in the route's dependencies.
            if not any(isinstance(d.call, SecurityBase) for d in _flat(route.dependant)):
                missing.append(f"{method} {route.path}")
    assert missing == []


def test_the_worker_exporters_route_declares_its_caller(settings: Settings) -> None:
    """A Celery worker's own /metrics (controller/api/worker_metrics.py) is guarded by
    the API's /metrics dependency itself, not a copy of it."""
    app = create_exporter_app(settings)
    (route,) = api_routes(app.routes)
    (api_metrics,) = [r for r in api_routes(create_app(settings).routes) if r.path == "/metrics"]
    assert route.path == "/metrics"
    assert [d.call for d in route.dependant.dependencies] == [
        d.call for d in api_metrics.dependant.dependencies
    ]
    assert any(isinstance(d.call, SecurityBase) for d in _flat(route.dependant))


def api_routes(routes: Iterable[Any]) -> Iterator[APIRoute]:
    """Every APIRoute of the app, into included routers (FastAPI keeps those as
    branches of their own)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def _flat(dependant: Any) -> list[Any]:
    out = []
    for dep in dependant.dependencies:
        out.append(dep)
        out.extend(_flat(dep))
    return out


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_an_anonymous_call_to_any_non_health_route_is_refused(
    client: TestClient, settings: Settings
) -> None:
    app = create_app(settings)
    refused = {}
    for route in api_routes(app.routes):
        for method in route.methods or ():
            if (method, route.path) in OPEN:
                continue
            resp = client.request(
                method, _concrete(route.path), headers=NO_TOKEN, follow_redirects=False
            )
            refused[f"{method} {route.path}"] = resp.status_code
    assert len(refused) > 25
    # The dashboard sends a browser to its sign-in page; every other route is a 401.
    pages = (
        "/",
        "/rollouts/{name}",
        "/models/{name}",
        "/clusters/{name}",
        "/clusters/{cluster}/nodes/{name}",
    )
    for path in pages:
        assert refused.pop(f"GET {path}") == 303
        assert refused.pop(f"GET /live{path}") == 303
    assert set(refused.values()) == {401}, {k: v for k, v in refused.items() if v != 401}
    resp = client.get("/v1/rollouts", headers=NO_TOKEN)
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"] == "unauthorized"


def test_roles(client: TestClient, sim_fleet: None) -> None:
    cluster = cluster_doc("lab", 2)
    # A viewer reads, and may not apply anything.
    assert client.get("/v1/clusters", headers=bearer("viewer")).status_code == 200
    resp = apply(client, cluster, dry_run=True)  # the admin's (the client's default)
    assert resp.status_code == 200, resp.text
    viewer = client.post(
        "/v1/apply",
        content="apiVersion: edgefleet.io/v1\nkind: Rollout\n",
        headers={**bearer("viewer"), "content-type": "application/yaml"},
    )
    assert viewer.status_code == 403
    assert "needs operator" in viewer.json()["detail"]
    # An operator applies rollouts and models, but not Clusters (credentials).
    operator = client.post(
        "/v1/apply",
        content=_yaml(cluster),
        headers={**bearer("operator"), "content-type": "application/yaml"},
    )
    assert operator.status_code == 403
    assert operator.json()["detail"][0]["loc"] == ["body", 0, "kind"]
    assert client.get("/v1/clusters").json() == []  # nothing was stored
    assert apply(client, cluster).status_code == 200
    ops = TestClient(client.app, headers=bearer("operator"))
    push_versions(ops, "1.0.0")
    assert apply(ops, rollout_doc("r", "1.0.0"), dry_run=True).status_code == 200
    # Tokens and node resets are the admin's.
    assert ops.get("/v1/tokens").status_code == 403
    assert ops.post("/v1/clusters/lab/nodes/lab-n0/reset").status_code == 403
    assert client.get("/v1/tokens").status_code == 200


def _yaml(doc: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(doc)


def test_tokens_are_hashed_shown_once_expire_and_are_revoked(
    client: TestClient, session: Session
) -> None:
    created = client.post("/v1/tokens", json={"name": "ci", "role": "operator", "expires": "1h"})
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    assert token.startswith("eft_")
    assert len(token) > 40
    row = session.scalar(select(ApiToken).where(ApiToken.name == "ci"))
    assert row is not None
    assert row.token_hash == hash_token(token)
    assert token not in str(client.get("/v1/tokens").json())
    who = client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert who.json() == {"actor": "token:ci", "role": "operator"}
    # The same name again is a conflict while the token is active.
    again = client.post("/v1/tokens", json={"name": "ci", "role": "admin"})
    assert again.status_code == 409
    bad = client.post("/v1/tokens", json={"name": "x", "role": "root", "expires": "soon"})
    assert bad.status_code == 422
    assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {("body", "role")}
    assert client.post(
        "/v1/tokens", json={"name": "x", "role": "viewer", "expires": "soon"}
    ).json()["detail"][0]["loc"] == ["body", "expires"]

    # Expired: refused.
    row.expires_at = utcnow() - timedelta(seconds=1)
    session.commit()
    assert client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    row.expires_at = None
    session.commit()
    assert client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # Revoked: refused at once; its name may then be reused.
    assert client.delete("/v1/tokens/ci").status_code == 200
    assert client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    listed = {t["name"]: t for t in client.get("/v1/tokens").json()}
    assert listed["ci"]["active"] is False
    assert listed["ci"]["revoked_at"]
    assert client.post("/v1/tokens", json={"name": "ci", "role": "viewer"}).status_code == 201
    assert client.delete("/v1/tokens/nope").status_code == 404
    # Made-up tokens of every shape are refused alike.
    for fake in ("eft_" + "A" * 43, "not-a-token", TOKENS["admin"] + "x", "eft_"):
        assert (
            client.get("/v1/whoami", headers={"Authorization": f"Bearer {fake}"}).status_code == 401
        )


def test_mutating_calls_record_their_actor(client: TestClient, sim_fleet: None) -> None:
    assert apply(client, cluster_doc("lab", 2)).status_code == 200
    ops = TestClient(client.app, headers=bearer("operator"))
    push_versions(ops, "1.0.0")
    assert apply(ops, rollout_doc("r", "1.0.0")).status_code == 200
    assert ops.post("/v1/rollouts/r/pause").status_code == 202
    with session_scope() as s:
        actors = {
            (e.object_kind, e.reason): e.actor
            for e in s.scalars(select(Event).order_by(Event.id)).all()
        }
    assert actors[("Cluster", "Applied")] == "token:test-admin"
    assert actors[("ModelVersion", "Pushed")] == "token:test-operator"
    assert actors[("Rollout", "Paused")] == "token:test-operator"
    events = ops.get("/v1/rollouts/r/events").json()
    assert {e["actor"] for e in events if e["reason"] == "Paused"} == {"token:test-operator"}


def test_metrics_follow_their_setting(client: TestClient, settings: Settings) -> None:
    assert client.get("/metrics", headers=NO_TOKEN).status_code == 401
    assert client.get("/metrics", headers=bearer("viewer")).status_code == 200
    open_app = create_app(settings.model_copy(update={"metrics_public": True}))
    with TestClient(open_app) as anon:
        assert anon.get("/metrics").status_code == 200
        assert anon.get("/v1/rollouts").status_code == 401


def test_dashboard_sign_in(client: TestClient, settings: Settings) -> None:
    browser = TestClient(client.app, follow_redirects=False)
    first = browser.get("/")
    assert (first.status_code, first.headers["location"]) == (303, "/login")
    wrong = browser.post("/login", data={"token": "eft_wrong"})
    assert wrong.status_code == 401
    # A sign-in posted from another site is refused (login CSRF).
    evil = {"Origin": "https://evil.example"}
    assert browser.post("/login", data={"token": TOKENS["viewer"]}, headers=evil).status_code == 403
    created = client.post("/v1/tokens", json={"name": "browser", "role": "viewer"})
    token = created.json()["token"]
    signed = browser.post("/login", data={"token": token})
    assert signed.status_code == 303
    cookie = signed.headers["set-cookie"]
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert token not in cookie  # the session holds no credential
    page = browser.get("/")
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    # The cookie is for the pages only: the API still wants the header.
    assert browser.get("/v1/rollouts").status_code == 401
    # A forged or altered session is refused; revoking the token ends its sessions.
    value = browser.cookies["edgefleet_session"]
    _name, expires, mac = value.split(".")
    forged = TestClient(client.app, follow_redirects=False)
    forged.cookies.set("edgefleet_session", f"test-admin.{expires}.{mac}")
    assert forged.get("/").status_code == 303
    assert client.delete("/v1/tokens/browser").status_code == 200
    assert browser.get("/").status_code == 303
    # Sign-out clears the cookie.
    browser.post("/login", data={"token": TOKENS["viewer"]})
    assert browser.get("/").status_code == 200
    assert browser.post("/logout", headers=evil).status_code == 403
    browser.post("/logout")
    assert browser.get("/").status_code == 303
    with TestClient(create_app(settings.model_copy(update={"dashboard_public": True}))) as anon:
        assert anon.get("/").status_code == 200


def test_the_only_plain_routes_are_the_api_description(settings: Settings) -> None:
    """Routes FastAPI adds itself (not APIRoutes, so not walked above) describe the API
    and hold no data; a new one must be added here knowingly."""
    app = create_app(settings)
    plain = {getattr(r, "path", "") for r in app.routes if not hasattr(r, "original_router")}
    plain -= {r.path for r in api_routes(app.routes)}
    assert plain == {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def test_artifact_downloads_need_a_token_a_node_credential_or_an_artifact_token(
    client: TestClient, settings: Settings, sim_fleet: None, join_token: str
) -> None:
    assert apply(client, cluster_doc("lab", 2), cluster_doc("far", 1)).status_code == 200
    push_versions(client, "1.0.0", "2.0.0")
    # The rollout is meant for lab's nodes only.
    lab_only = {"matchLabels": {"site": "lab"}}
    assert apply(client, rollout_doc("r", "1.0.0", selector=lab_only)).status_code == 200
    assert drive("r", settings)[-1] == "Succeeded"
    canary, other = "lab-n0", "far-n0"
    url = "/v1/models/detector/versions/{}/artifact".format
    assert client.get(url("1.0.0"), headers=NO_TOKEN).status_code == 401
    assert client.get(url("2.0.0"), headers=bearer("viewer")).status_code == 200

    def credential(cluster: str, node: str) -> dict[str, str]:
        body = {"cluster": cluster, "node": node, "join_token": join_token}
        enrolled = client.post("/v1/agents/enroll", json=body)
        assert enrolled.status_code == 200, enrolled.text
        return {"Authorization": f"Bearer {enrolled.json()['credential']}"}

    node = credential("lab", canary)
    got = client.get(url("1.0.0"), headers=node)
    assert got.status_code == 200
    assert got.headers["cache-control"].startswith("private")
    # Only what the node is meant to run: not another version, not another cluster's.
    refused = client.get(url("2.0.0"), headers=node)
    assert refused.status_code == 403
    assert f"not assigned to node lab/{canary}" in refused.json()["detail"]
    assert client.get(url("1.0.0"), headers=credential("far", other)).status_code == 403

    secret = settings.secret_key.get_secret_value()
    now = time.time()

    def artifact(cluster: str) -> dict[str, str]:
        token = mint_artifact_token(secret, cluster, now=now, ttl_s=settings.artifact_token_ttl_s)
        assert verify_artifact_token(secret, token, now=now) == cluster
        return {"Authorization": f"Bearer {token}"}

    got = client.get(url("1.0.0"), headers=artifact("lab"))
    assert got.status_code == 200
    assert len(got.content) > 1000
    assert client.get(url("2.0.0"), headers=artifact("lab")).status_code == 403
    assert client.get(url("1.0.0"), headers=artifact("far")).status_code == 403
    assert client.get(url("1.0.0"), headers=artifact("nowhere")).status_code == 403
    # Expired, forged, re-scoped or malformed tokens are refused.
    token = artifact("lab")["Authorization"].removeprefix("Bearer ")
    old = mint_artifact_token(secret, "lab", now=now - 30 * 86400, ttl_s=86400)
    forged = mint_artifact_token("another-secret", "lab", now=now, ttl_s=86400)
    prefix, _, expires, mac = token.split(".")
    moved = ".".join((prefix, "far", expires, mac))
    odd = [f"efa1.lab.{expires}.{mac.upper()}", "efa1.lab.99999999999999999999.x", "efa1..."]
    for bad in (old, forged, moved, *odd):
        resp = client.get(url("1.0.0"), headers={"Authorization": f"Bearer {bad}"})
        assert resp.status_code == 401, bad
    # Digits that are not ASCII digits (str.isdigit takes them) and non-ASCII MACs.
    assert verify_artifact_token(secret, f"efa1.lab.\u00b2\u00b3.{mac}", now=now) is None
    assert verify_artifact_token(secret, f"efa1.lab.{expires}.\u00e9\u00e9", now=now) is None
    # A node credential or an artifact token opens downloads only, nothing else.
    assert client.get("/v1/rollouts", headers=node).status_code == 401
    assert client.get("/v1/rollouts", headers=artifact("lab")).status_code == 401


def test_artifact_tokens_rotate_twice_a_lifetime() -> None:
    ttl = 3600.0
    tokens = {mint_artifact_token("s", "c", now=t, ttl_s=ttl) for t in range(0, 7200, 60)}
    assert len(tokens) == 4  # one per half-lifetime
    for t in range(0, 7200, 60):
        token = mint_artifact_token("s", "c", now=t, ttl_s=ttl)
        assert verify_artifact_token("s", token, now=t + ttl / 2 - 1) == "c"
        assert verify_artifact_token("s", token, now=t + ttl + 1) is None


def test_cli_creates_the_first_admin_token_on_the_database(
    settings: Settings, committed: None
) -> None:
    """Committed for real: the CLI is another process on its own connection."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli.main",
            "tokens",
            "create",
            "--name",
            "first",
            "--role",
            "admin",
            "--expires",
            "30d",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip().splitlines()[-1]
    client = TestClient(create_app(settings), headers=bearer("admin"))
    try:
        who = client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert who.json() == {"actor": "token:first", "role": "admin"}, who.text
        listed = {t["name"]: t for t in client.get("/v1/tokens").json()}
        assert listed["first"]["created_by"].startswith("cli:")
        assert listed["first"]["expires_at"] is not None
    finally:
        # `committed` empties every table but the run's tokens: this one goes too.
        with get_engine().begin() as conn:
            conn.execute(text("DELETE FROM api_tokens WHERE name = 'first'"))
