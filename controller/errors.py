"""One error hierarchy for the controller. Every error carries its HTTP status and a
machine-readable code; the API turns each into ``{"error": code, "detail": ...}``."""

from __future__ import annotations

from typing import Any


class EdgefleetError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail if detail is not None else message
        self.headers: dict[str, str] | None = None


class NotFound(EdgefleetError):
    status_code = 404
    code = "not_found"


class Unauthorized(EdgefleetError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(EdgefleetError):
    status_code = 403
    code = "forbidden"


class Conflict(EdgefleetError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(EdgefleetError):
    status_code = 413
    code = "payload_too_large"


class InvalidInput(EdgefleetError):
    """A request that parsed but makes no sense. ``loc`` is the field path, as in
    pydantic's 422 errors, so clients handle both the same way."""

    status_code = 422
    code = "validation_error"

    def __init__(self, message: str, *, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(
            message, detail=[{"loc": list(loc), "msg": message, "type": "value_error"}]
        )
        self.loc = loc


class ServiceUnavailable(EdgefleetError):
    status_code = 503
    code = "service_unavailable"
