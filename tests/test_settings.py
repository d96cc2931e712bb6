from __future__ import annotations

import pytest
from pydantic import ValidationError

from controller.settings import DEV_SECRET, Settings


def test_default_secret_refused_outside_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_SECRET_KEY", raising=False)
    with pytest.raises(ValidationError, match="EDGEFLEET_SECRET_KEY must be set"):
        Settings(environment="production", _env_file=None)
    dev = Settings(environment="development", _env_file=None)
    assert dev.secret_key.get_secret_value() == DEV_SECRET


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EDGEFLEET_REDIS_URL", "EDGEFLEET_TASKS_EAGER", "EDGEFLEET_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(_env_file=None)
    assert s.database_url.startswith("sqlite:///")
    assert s.eager_tasks is True
    assert Settings(redis_url="redis://x", _env_file=None).eager_tasks is False


def test_env_prefix_and_secret_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_SECRET_KEY", "hunter2-hunter2")
    monkeypatch.setenv("EDGEFLEET_API_PORT", "9999")
    s = Settings(_env_file=None)
    assert s.api_port == 9999
    assert "hunter2" not in repr(s)
