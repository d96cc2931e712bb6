"""The endpoints of ``edgefleet-serve``::

    GET  /healthz          200 while the process runs
    GET  /readyz           200 once a model is loaded and warmed up, 503 before and while draining
    GET  /metrics          Prometheus text
    GET  /v1/model         the served version and its signature
    POST /v1/infer         JSON {"inputs": {...}}, application/x-npz, one tensor as
                           application/x-npy or as raw bytes (application/octet-stream with
                           X-Tensor-Dtype and X-Tensor-Shape); answers in kind
    POST /v1/admin/swap    stage-then-activate a new version (loopback or bearer token)

The body forms are described in :mod:`node_agent.server.tensors`; raw bytes are the
cheapest (no decoding beyond ``np.frombuffer``), for clients that know the signature.
An inference runs as :mod:`node_agent.server.fastpath` says.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from node_agent.cache import ArtifactUnavailable, ChecksumMismatch
from node_agent.server.fastpath import PLANNED, FastPath, Replay
from node_agent.server.model import ModelLoadError, ModelSource, SwapInProgress
from node_agent.server.tensors import (
    DTYPE_HEADER,
    NAME_HEADER,
    RAW_TYPE,
    SHAPE_HEADER,
    RequestError,
)


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    format: Literal["onnx", "tflite"] | None = None
    model_version: str = Field(min_length=1)
    model_name: str | None = None


class Handler(FastPath):
    """The handler the listener runs for each connection: the endpoints, and ``routes``
    to them."""

    def healthz(self) -> None:
        self._json(200, {"status": "alive", "state": self.server.app.state})

    def readyz(self) -> None:
        app = self.server.app
        model = app.current
        if app.ready and model is not None:
            self._json(200, {"status": "ready", "model": model.name, "version": model.version})
        else:
            self._json(503, {"status": "not ready", "state": app.state})

    def metrics(self) -> None:
        app = self.server.app
        app.settle()
        self._respond(200, app.metrics.render(), CONTENT_TYPE_LATEST)

    def model(self) -> None:
        model = self.server.app.current
        if model is None:
            self._error(RequestError(503, "not_ready", "no model is loaded yet"))
            return
        self._json(200, {**model.describe(), "ready": self.server.app.ready})

    def infer(self) -> None:
        started = time.perf_counter()
        app = self.server.app
        model = app.current  # this request runs on this version, whatever swaps meanwhile
        fields = self._fields
        try:
            # Draining still answers (with Connection: close, see InferenceServer.shutdown):
            # a request reaching a server being replaced is served, never refused.
            if model is None or app.state not in ("ready", "draining"):
                # Read the body anyway, so the connection stays usable.
                self._read_body()
                raise RequestError(503, "not_ready", "the model is not loaded and warmed up yet")
            plan = key = None
            if fields.get("content-type") == RAW_TYPE:  # the hot path: headers seen before?
                key = (
                    fields.get(DTYPE_HEADER),
                    fields.get(SHAPE_HEADER),
                    fields.get(NAME_HEADER),
                    fields.get("accept"),
                )
                plan = model.raw_plans.get(key)
            body = self._read_body()
            if plan is not None and len(body) == plan.nbytes:
                feeds, answer = PLANNED, plan.answer  # (decoded in _answer, unless bound)
            else:
                feeds, answer, plan = self._decode(model, body, key)
        except RequestError as exc:
            app.metrics.rejected.labels(str(exc.status)).inc()
            self._error(exc)
            return
        bound = self._answer(started, model, body, feeds, answer, plan)
        if bound is not None and "expect" not in fields:
            # The same head again on this connection is the same request: it runs on the
            # same binding without being parsed, routed or decoded again.
            self._replay = Replay(self._request, bound.plan, len(body))

    def admin_swap(self) -> None:
        app = self.server.app
        if not app.admin_allowed(self.client_address[0], self.header("authorization")):
            self.close_connection = True
            self._error(
                RequestError(
                    403, "forbidden", "admin endpoints take loopback callers or the admin token"
                )
            )
            return
        try:
            body = self._read_body()
            request = SwapRequest.model_validate_json(bytes(body))
        except RequestError as exc:
            self._error(exc)
            return
        except ValidationError as exc:
            errors = json.loads(exc.json(include_url=False, include_input=False))
            self._json(422, {"error": "validation_error", "detail": errors})
            return
        current = app.current
        source = ModelSource(
            name=request.model_name or (current.name if current else app.settings.model_name),
            version=request.model_version,
            format=request.format,
            url=request.model_url,
            sha256=request.sha256.lower(),
        )
        try:
            model = app.swap(source)
        except SwapInProgress as exc:
            self._error(RequestError(409, "swap_in_progress", str(exc)))
        except ChecksumMismatch as exc:
            self._error(RequestError(422, "sha256_mismatch", str(exc)))
        except ArtifactUnavailable as exc:
            self._error(RequestError(502, "artifact_unavailable", str(exc)))
        except ModelLoadError as exc:
            self._error(RequestError(422, "model_load_failed", str(exc)))
        else:
            self._json(200, {"status": "active", **model.describe()})

    routes = {
        "/healthz": {"GET": healthz},
        "/readyz": {"GET": readyz},
        "/metrics": {"GET": metrics},
        "/v1/model": {"GET": model},
        "/v1/infer": {"POST": infer},
        "/v1/admin/swap": {"POST": admin_swap},
    }
