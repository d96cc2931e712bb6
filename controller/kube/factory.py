from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from sqlalchemy.orm import Session

from controller.crypto import mint_artifact_token
from controller.errors import InvalidInput
from controller.kube.driver import ClusterDriver
from controller.kube.pull import PullDriver
from controller.kube.simulated import LocalState, RedisState, SimState, SimulatedDriver
from controller.settings import Settings

_states: dict[str | None, SimState] = {}


def _sim_state(settings: Settings) -> SimState:
    state = _states.get(settings.redis_url)
    if state is None:
        state = RedisState(settings.redis_url) if settings.redis_url else LocalState()
        _states[settings.redis_url] = state
    return state


def driver_for(
    name: str,
    driver: str,
    spec: dict[str, Any],
    settings: Settings,
    credentials: dict[str, Any] | None = None,
    *,
    session: Session | None = None,
) -> ClusterDriver:
    """The driver of one cluster. A cluster in pull mode is driven through the database
    (``session``: the caller's, so what it publishes commits with the caller's decision)."""

    def artifact_token() -> str:
        return mint_artifact_token(
            settings.secret_key.get_secret_value(),
            name,
            now=time.time(),
            ttl_s=settings.artifact_token_ttl_s,
        )

    if driver == "local":
        if not settings.local_driver:
            raise InvalidInput(
                "driver 'local' runs processes on the controller's own host and is off "
                "(EDGEFLEET_LOCAL_DRIVER=true enables it, for development only)",
                loc=("body", "spec", "driver"),
            )
        from controller.kube.local import LocalDriver  # lazy: development only

        return LocalDriver(name, spec.get("local") or {}, artifact_token=artifact_token)
    if driver == "simulated":
        return SimulatedDriver(
            name, spec.get("simulated") or {}, _sim_state(settings), settings.sim_state_prefix
        )
    if driver == "kubernetes" and spec.get("mode") == "pull":
        if session is None:
            raise ValueError("a pull cluster's driver needs the session")
        return PullDriver(session, name, silent_after_s=settings.pull_silent_s)
    if driver == "kubernetes":
        if not credentials:
            raise InvalidInput(
                "driver 'kubernetes' needs credentials (token or kubeconfig)",
                loc=("body", "spec", "credentials"),
            )
        # Lazy: the kubernetes library is a large import, and only processes
        # that talk to a real cluster need it.
        from controller.kube.client import KubernetesDriver, cached_driver

        # Any change of the applied spec (server, namespace, credentials) is a new client.
        key = (name, hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest())
        return cached_driver(
            key,
            lambda: KubernetesDriver(
                name,
                server=spec.get("server"),
                namespace=spec.get("namespace", "edgefleet-workloads"),
                credentials=credentials,
                image=settings.inference_image,
                port=settings.inference_port,
                timeout_s=settings.kube_request_timeout_s,
                backoff=settings.kube_retry_backoff_s,
                artifact_token=artifact_token,
            ),
        )
    raise InvalidInput(
        f"unknown driver {driver!r} (available: kubernetes, simulated)",
        loc=("body", "spec", "driver"),
    )
