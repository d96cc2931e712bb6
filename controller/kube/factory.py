from __future__ import annotations

from typing import Any

from controller.errors import InvalidInput
from controller.kube.driver import ClusterDriver
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
) -> ClusterDriver:
    if driver == "simulated":
        return SimulatedDriver(name, spec.get("simulated") or {}, _sim_state(settings))
    raise InvalidInput(
        f"driver {driver!r} is not available in this release (available: simulated)",
        loc=("body", "spec", "driver"),
    )
