from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from controller import __version__, metrics
from controller.agents import endpoints as agents
from controller.api import health
from controller.api.errors import install_error_handlers
from controller.benchmarks import endpoints as benchmarks
from controller.dashboard import endpoints as dashboard
from controller.fleet import endpoints as fleet
from controller.manifests import endpoints as manifests
from controller.registry import endpoints as registry
from controller.rollouts import endpoints as rollouts
from controller.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="edgefleet",
        version=__version__,
        description="Roll ML models out to fleets of K3s edge nodes, wave by wave, behind gates.",
    )
    app.state.settings = settings
    install_error_handlers(app)

    routers = (
        registry.router,
        manifests.router,
        rollouts.router,
        fleet.router,
        dashboard.router,
        agents.router,
        benchmarks.router,
    )
    for router in routers:
        app.include_router(router)
    app.include_router(health.router)

    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        # The route template, not the raw path, keeps label cardinality bounded. Domain
        # routers carry their full /v1/... prefix: FastAPI mounts included routers, and
        # an include-time prefix would not appear in the matched route's path.
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics.HTTP_REQUESTS.labels(
            request.method, template, f"{response.status_code // 100}xx"
        ).observe(time.perf_counter() - started)
        return response

    return app
