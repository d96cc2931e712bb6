from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller import __version__, metrics
from controller.agents import endpoints as agents
from controller.agents.service import HeartbeatIntake
from controller.api import events, health
from controller.auth import endpoints as auth
from controller.benchmarks import endpoints as benchmarks
from controller.dashboard import endpoints as dashboard
from controller.dashboard.live import Slots
from controller.fleet import endpoints as fleet
from controller.manifests import endpoints as manifests
from controller.optimizations import endpoints as optimizations
from controller.registry import endpoints as registry
from controller.rollouts import endpoints as rollouts
from controller.schedules import endpoints as schedules
from controller.settings import Settings, get_settings
from controller.web.body_limits import LimitRequestBodies
from controller.web.errors import install_error_handlers


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="edgefleet",
        version=__version__,
        description="Roll ML models out to fleets of K3s edge nodes, wave by wave, behind gates.",
    )
    app.state.settings = settings
    install_error_handlers(app)

    # Routes are matched in order: the agents' (every node's heartbeat, every interval:
    # most requests by far) first. No other router has a path that would match theirs.
    routers = (
        agents.router,
        registry.router,
        optimizations.router,
        manifests.router,
        rollouts.router,
        schedules.router,
        fleet.router,
        dashboard.router,
        benchmarks.router,
        auth.router,
    )
    for router in routers:
        app.include_router(router)
    app.include_router(events.router)
    app.include_router(health.router)

    app.add_middleware(LimitRequestBodies, settings=settings)  # within ObserveRequests
    app.add_middleware(ObserveRequests)
    # Heartbeat requests meet here to share ingest transactions.
    app.state.heartbeats = HeartbeatIntake(settings)
    app.state.live_slots = Slots(settings.dashboard_live_streams)
    return app


class ObserveRequests:
    """edgefleet_http_request_duration_seconds by route template and status class. A
    plain ASGI middleware: BaseHTTPMiddleware (``@app.middleware("http")``) costs a task
    group and memory streams per request, a good part of a heartbeat's CPU."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an error escaped every handler

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            # The route template, not the raw path, keeps label cardinality bounded.
            # Domain routers carry their full /v1/... prefix: FastAPI mounts included
            # routers, and an include-time prefix would not appear in the route's path.
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(scope["method"], template, f"{status // 100}xx").observe(
                time.perf_counter() - started
            )
