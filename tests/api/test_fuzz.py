"""The whole OpenAPI document, fuzzed with Schemathesis as an admin: whatever a client
sends, the answer is never a 5xx. Bounded (a few examples per operation), and every
cluster it could make the controller contact is refused by a loopback-only allow-list,
so nothing leaves this machine."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error

from controller.api.app import create_app
from controller.settings import Settings
from tests.conftest import bearer

# Settings of this app only (the process's are the environment's, set by conftest):
# enrolment on, as in production (off, it is a deliberate 503).
APP_SETTINGS = Settings(
    cluster_server_allowlist=["127.0.0.0/8"], agent_join_token=SecretStr("fuzz-join-token")
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(APP_SETTINGS))


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: Any, connection: Any, redis_available: None) -> None:
    response = case.call(headers=bearer("admin"))
    case.validate_response(response, checks=[not_a_server_error])
