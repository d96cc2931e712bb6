"""The inference path behind ``POST /v1/infer``: decoding, the run, the answer; and the
raw form's hot path through it, in three steps that each keep only what the last request
proved (a request that differs in anything takes the general path, and the general
path's answer is the reference the tests hold each step to):

1. a *plan* per model version and header set: a body of the planned length is one
   ``np.frombuffer`` from the runtime, and an answer like the last one reuses its head;
2. a *binding* per connection and plan (onnxruntime IOBinding, ``OnnxBinding``): the body
   is read by the runtime where it lies and the answer written into an array kept for the
   next one, about 2-3 % of a 1.5 ms CNN's run less than ``session.run``;
3. a *replay*: a head byte for byte the last one's, which ran on the binding, goes
   straight to it, without routing or header checks again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from node_agent.server.connection import Request
from node_agent.server.model import ActiveModel, BoundPlan
from node_agent.server.npz import Body
from node_agent.server.router import Router, header_lines
from node_agent.server.tensors import (
    DTYPE_HEADER,
    JSON_TYPE,
    NAME_HEADER,
    NPY_TYPE,
    NPZ_TYPE,
    RAW_TYPE,
    SHAPE_HEADER,
    SINGLE_TENSOR_TYPES,
    RawPlan,
    RequestError,
    decode_json,
    decode_npz,
    decode_tensor,
    encode_json,
    encode_npy,
    encode_npz,
    encode_raw,
    media_type,
    raw_feeds,
    response_type,
    validate,
)

log = logging.getLogger("node_agent.serve")

PLANNED: dict[str, np.ndarray] = {}  # the feeds of a plan's request, before decoding
_MAX_PLANS = 64  # raw plans per version; a client cycling through more header sets than
# that takes the general path more often
_UNSUPPORTED = (
    f"send {JSON_TYPE}, {NPZ_TYPE}, {NPY_TYPE} (one tensor) or {RAW_TYPE} (one tensor, "
    "with X-Tensor-Dtype and X-Tensor-Shape)"
)


@dataclass(slots=True)
class Replay:
    """What a connection's last request was, when the same head again may skip to its
    binding (see FastPath._infer_again): the parsed head, its plan, its body's length."""

    request: Request
    plan: RawPlan
    length: int


def model_head(model: ActiveModel) -> str:
    """The ``X-Model-*`` header lines of an inference answer, formatted once per
    version."""
    head = model.answer_head  # (kept by the version: nothing here holds an old one)
    if head is None:
        head = model.answer_head = header_lines(
            {
                "X-Model-Name": model.name,
                "X-Model-Version": model.version,
                "X-Model-Sha256": model.sha256,
            }
        )
    return head


class FastPath(Router):
    """A connection's inference requests: run, answer, and the hot path's state."""

    _latencies = (0.0, 0.0)  # the last answer's inference and request seconds
    _replay: Replay | None = None  # what the same head again may skip to

    def _dispatch(self, method: str) -> None:
        replay, self._replay = self._replay, None  # (set again by the answer it allows)
        if replay is not None and self._request is replay.request:
            self._infer_again(replay)
        else:
            super()._dispatch(method)

    def _infer_again(self, replay: Replay) -> None:
        """A request whose head is byte for byte the last one's, which ran on this
        connection's binding: everything its head says was checked then. Anything else
        (another version, draining, the binding gone) takes the way of any request."""
        started = time.perf_counter()
        app = self.server.app
        model = app.current
        plan = replay.plan
        bound = model.binding_of(id(self), plan) if model is not None and app.ready else None
        if model is None or bound is None or not plan.bindable:  # (ready: not draining)
            if (handler := self._lookup(self.command)) is not None:
                handler(self)
            return
        try:
            body = self.conn.read_body(replay.length)
        except ConnectionError:
            self.close_connection = True
            app.metrics.rejected.labels("400").inc()
            self._error(RequestError(400, "bad_request", "the body ended before Content-Length"))
            return
        self._unread = False
        if self._answer(started, model, body, PLANNED, plan.answer, plan, bound) is not None:
            self._replay = replay

    def _answer(
        self,
        started: float,
        model: ActiveModel,
        body: memoryview,
        feeds: dict[str, np.ndarray],
        answer: str,
        plan: RawPlan | None,
        bound: BoundPlan | None = None,
    ) -> BoundPlan | None:
        """Run a request that passed its checks and send the answer. ``feeds`` is
        ``PLANNED`` for a request of ``plan`` (its body not decoded yet); ``bound``, the
        connection's binding of it where the caller has looked it up already. Returns the
        binding it ran on, if it did."""
        metrics = self.server.app.metrics
        # An answer like the last one to these headers reuses its head, and a plan's
        # request runs on this connection's binding of it; decided before the run, so
        # that the least Python runs on caches the inference evicts.
        planned = feeds is PLANNED
        last = None
        if plan is not None and self._plain_head:
            last = plan.last
            if bound is None and planned and last is not None:
                bound = model.bound(id(self), plan, last)
        if last is None or not planned:
            bound = None  # (its answer's head is reused: a plain one only)
        t0 = time.perf_counter()
        failed: Exception | None = None
        ran = False
        if bound is not None:
            try:
                ran = bound.run(self.conn.body_address)
            except Exception as exc:  # the binding's failure or the model's: run it again
                failed = exc
        try:
            payload: bytes | memoryview | None = None
            if ran and bound is not None:
                t1 = time.perf_counter()
                data, payload, nbytes = bound.answer.head, bound.payload, bound.answer.nbytes
            else:
                if planned and plan is not None:
                    feeds = raw_feeds(body, plan)
                outputs = model.run(feeds)
                if failed is not None and bound is not None:
                    bound.failed(failed)  # (this run passed: the binding is what failed)
                bound = None
                t1 = time.perf_counter()
                if last is not None and (payload := last.matches(outputs)) is not None:
                    data, nbytes = last.head, last.nbytes
                else:
                    data, payload = self._encode(model, outputs, answer, plan)
                    nbytes = None
        except Exception as exc:
            metrics.requests.inc()
            metrics.errors.inc()
            log.warning("inference failed on %s %s: %s", model.name, model.version, exc)
            failure = RequestError(500, "inference_failed", f"{type(exc).__name__}: {exc}")
            metrics.request_latency.observe(time.perf_counter() - started)
            head = model_head(model)
            self._respond(failure.status, json.dumps(failure.as_dict()).encode(), head=head)
            return None
        self._latencies = (t1 - t0, time.perf_counter() - started)
        self.sent += 1
        try:  # (a client slow to read is not waited for before counting: before_waiting)
            self.conn.send(data, payload, nbytes, before_waiting=self._account)
        finally:
            self._account()
        return bound

    def _account(self) -> None:
        """Count the answer just sent, once it has left: off the client's path. A scrape
        waits for answers sent before it to be counted (InferenceServer.settle)."""
        if self.counted < self.sent:
            inference_s, request_s = self._latencies
            metrics = self.server.app.metrics
            metrics.requests.inc()
            metrics.inference_latency.observe(inference_s)
            metrics.request_latency.observe(request_s)
            self.counted = self.sent

    def _decode(
        self, model: ActiveModel, body: Body, key: tuple[str | None, ...] | None
    ) -> tuple[dict[str, np.ndarray], str, RawPlan | None]:
        """The feeds and the answer's form, every check made. A raw request's outcome is
        kept as the version's plan for ``key`` (its headers), and returned."""
        app = self.server.app
        fields = self._fields
        request_type = media_type(fields.get("content-type")) or JSON_TYPE
        runner = model.runner
        specs = runner.inputs
        if request_type in SINGLE_TENSOR_TYPES:
            arrays = decode_tensor(
                body,
                request_type,
                specs,
                name=fields.get(NAME_HEADER),
                dtype=fields.get(DTYPE_HEADER),
                shape=fields.get(SHAPE_HEADER),
            )
        elif request_type == NPZ_TYPE:
            settings = app.settings
            arrays = decode_npz(
                body,
                specs,
                max_members=settings.max_npz_members,
                max_bytes=settings.max_body_bytes * 4,
            )
        elif request_type == JSON_TYPE:
            arrays = decode_json(bytes(body), specs)
        else:
            raise RequestError(415, "unsupported_media_type", _UNSUPPORTED)
        feeds = validate(arrays, specs)
        answer = response_type(fields.get("accept"), request_type, len(runner.outputs))
        plan = None
        if key is not None and (plan := RawPlan.of(arrays, feeds, answer)) is not None:
            plans = model.raw_plans
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plans[key] = plan
        return feeds, answer, plan

    def _encode(
        self,
        model: ActiveModel,
        outputs: dict[str, np.ndarray],
        answer: str,
        plan: RawPlan | None,
    ) -> tuple[bytes, bytes | memoryview]:
        """The answer's head and payload; a raw answer's head is remembered by the plan
        of its request, for the next answer like it."""
        tensor_headers: dict[str, str] | None = None
        payload: bytes | memoryview
        if answer in SINGLE_TENSOR_TYPES and len(outputs) != 1:
            answer = NPZ_TYPE
        if answer == RAW_TYPE:
            ((name, array),) = outputs.items()
            payload, tensor_headers = encode_raw(name, array)
        elif answer == NPY_TYPE:
            ((name, array),) = outputs.items()
            payload = encode_npy(array)
            tensor_headers = {"X-Tensor-Name": name.encode().decode("latin-1")}
        elif answer == NPZ_TYPE:
            payload = encode_npz(outputs)
        else:
            payload = encode_json(outputs, model=model.name, version=model.version)
            answer = JSON_TYPE
        head_model = model_head(model)
        data = self._head(200, answer, len(payload), tensor_headers, head_model)
        if answer == RAW_TYPE and plan is not None and self._plain_head:
            plan.remember(outputs, data, payload)
        return data, payload

    @property
    def _plain_head(self) -> bool:
        """Whether this answer's head says nothing about the connection (the only heads
        a plan keeps and reuses)."""
        return not (self.close_connection or self._http10 or self.server.app.draining)
