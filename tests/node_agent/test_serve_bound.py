"""The raw-tensor hot path's last two steps, on real onnxruntime sessions and real
sockets: a connection's *binding* (the runtime reads the body where it lies and writes
into an array kept for the next answer) and the *replay* of a head seen before. Every
answer is checked against a plain onnxruntime session; every way out of the fast path
(another shape of answer, a model error, a swap, draining, pipelined bodies, a short
body, ``Expect``) is taken on purpose and must answer as the general path does."""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

from node_agent.runtimes import OnnxBinding, OnnxRunner
from node_agent.server import model as model_module
from node_agent.server.app import InferenceServer
from node_agent.server.endpoints import Handler
from node_agent.server.model import ActiveModel
from node_agent.server.tensors import RAW_TYPE, RawAnswer, RawPlan
from tests.node_agent.test_serve_connection import image, raw_request
from tests.node_agent.test_serve_helpers import (
    Models,
    Origin,
    ort_run,
    running,
    settings_for,
    sha256,
    wait_for,
)
from tests.node_agent.test_serve_wire import closed, connect, read_response


def build_positives_model(width: int = 8) -> bytes:
    """``where(x > 0)``: an output whose length depends on the data (NonZero)."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["zero"], value_float=0.0),
            helper.make_node("Greater", ["x", "zero"], ["positive"]),
            helper.make_node("NonZero", ["positive"], ["where"]),
        ],
        "positives",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [width])],
        [helper.make_tensor_value_info("where", TensorProto.INT64, [1, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def aligned(nbytes: int) -> tuple[np.ndarray, int]:
    """A buffer of ``nbytes`` and the 64-byte aligned address inside it."""
    buffer = np.zeros(nbytes + 64, np.uint8)
    start = -int(buffer.ctypes.data) % 64
    return buffer[start : start + nbytes], int(buffer.ctypes.data) + start


# ---------------------------------------------------------------------- the binding
def test_a_binding_reads_its_input_at_run_time(models: Models) -> None:
    runner = OnnxRunner(models.cnn, threads=1)
    want_shape = ort_run(models.cnn, {"image": image(0)})["probabilities"].shape
    binding = runner.bind(
        "image",
        np.dtype(np.float32),
        (1, 3, 32, 32),
        {"probabilities": (np.dtype(np.float32), want_shape)},
    )
    first, first_at = aligned(image(0).nbytes)
    second, second_at = aligned(image(0).nbytes)
    results = []
    for seed, (buffer, at) in enumerate([(first, first_at)] * 3 + [(second, second_at)] * 2):
        x = image(seed)
        buffer[:] = np.frombuffer(x.tobytes(), np.uint8)  # new bytes, the same address
        got = binding.run(at)["probabilities"]
        results.append(got)
        want = ort_run(models.cnn, {"image": x})["probabilities"]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert all(r is results[0] for r in results)  # one array, written again each run


def test_a_binding_refuses_an_output_of_another_shape(tmp_path: Path) -> None:
    """The caller relies on this to fall back: a binding never answers in a shape that
    is not the one it was made for."""
    path = tmp_path / "positives.onnx"
    path.write_bytes(build_positives_model())
    runner = OnnxRunner(path, threads=1)
    x = np.array([1, -1, 2, -2, 3, -3, 0, 0], np.float32)
    binding = runner.bind("x", x.dtype, x.shape, {"where": (np.dtype(np.int64), (1, 3))})
    buffer, at = aligned(x.nbytes)
    buffer[:] = np.frombuffer(x.tobytes(), np.uint8)
    assert binding.run(at)["where"].tolist() == [[0, 2, 4]]
    buffer[:] = np.frombuffer(np.ones(8, np.float32).tobytes(), np.uint8)
    with pytest.raises(Exception, match="shape"):
        binding.run(at)


def test_a_binding_checks_its_outputs_land_in_its_arrays(models: Models) -> None:
    """Where onnxruntime answers an output from other memory than the bound array, the
    run raises rather than return the array's old bytes."""
    runner = OnnxRunner(models.cnn, threads=1)
    binding = runner.bind(
        "image",
        np.dtype(np.float32),
        (1, 3, 32, 32),
        {"probabilities": (np.dtype(np.float32), (1, 10))},
    )
    _, at = aligned(image(0).nbytes + 64)
    binding.run(at)  # checked once, after the first run at this address
    binding.outputs["probabilities"] = np.empty((1, 10), np.float32)  # not what is bound
    binding.run(at)  # (not checked again at the same address)
    with pytest.raises(RuntimeError, match="from other memory"):
        binding.run(at + 64)  # a new address: checked again


def build_echo_model() -> bytes:
    """No nodes: the output is the input itself."""
    graph = helper.make_graph(
        [],
        "echo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


# ---------------------------------------------------------------------- the server
Counter = dict[str, int]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How often requests ran on a binding and how often a head was replayed."""
    counts: Counter = {"bound": 0, "replayed": 0}

    def counting(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return inner(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(OnnxBinding, "run", counting("bound", OnnxBinding.run))
    monkeypatch.setattr(Handler, "_infer_again", counting("replayed", Handler._infer_again))
    return counts


@pytest.fixture
def bindings_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made: list[str] = []
    inner = OnnxRunner.bind

    def bind(self: OnnxRunner, input: str, *args: Any) -> OnnxBinding:
        made.append(input)
        return inner(self, input, *args)

    monkeypatch.setattr(OnnxRunner, "bind", bind)
    return made


def infer(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    return read_response(sock)


def check_cnn(path: Path, x: np.ndarray, answer: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = answer
    assert status == 200, body
    assert headers["x-tensor-shape"] == "1,10"
    want = ort_run(path, {"image": x})["probabilities"]
    np.testing.assert_allclose(
        np.frombuffer(body, np.float32).reshape(1, 10), want, rtol=1e-6, atol=1e-7
    )


def test_raw_requests_run_bound_then_replayed(
    cnn_server: InferenceServer, models: Models, counted: Counter
) -> None:
    """Request 1 makes the plan, 2 the binding, 3 on are replays: each with its own
    input, each answer right; the binding leaves with its connection."""
    model = cnn_server.current
    assert model is not None
    with connect(cnn_server) as sock:
        for seed in range(8):
            x = image(seed)
            check_cnn(models.cnn, x, infer(sock, raw_request(x)))
        assert counted == {"bound": 7, "replayed": 6}
        assert len(model.bindings) == 1
        # Another connection has a binding of its own.
        with connect(cnn_server) as other:
            for seed in range(3):
                check_cnn(models.cnn, image(seed), infer(other, raw_request(image(seed))))
            assert len(model.bindings) == 2
    assert wait_for(lambda: not model.bindings)


def test_other_requests_between_replays(
    cnn_server: InferenceServer, models: Models, counted: Counter
) -> None:
    """Any other request on the connection ends the replay; the next raw one runs on
    the binding again and is replayed after that."""
    with connect(cnn_server) as sock:
        for seed in range(3):
            check_cnn(models.cnn, image(seed), infer(sock, raw_request(image(seed))))
        assert infer(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
        x = image(5)
        accept_npz = raw_request(x, "Accept: application/x-npz\r\n")
        status, headers, _ = infer(sock, accept_npz)  # other headers: another plan
        assert (status, headers["content-type"]) == (200, "application/x-npz")
        before = dict(counted)
        for seed in range(6, 9):
            check_cnn(models.cnn, image(seed), infer(sock, raw_request(image(seed))))
        assert counted["bound"] - before["bound"] == 3
        assert counted["replayed"] - before["replayed"] == 2


def test_pipelined_bodies_off_alignment_take_the_general_path(
    cnn_server: InferenceServer, models: Models, counted: Counter
) -> None:
    """Bodies that arrive together land wherever the previous request ended: one that is
    not aligned for float32 is copied and run the general way, with the same answer."""
    pad = "X-Pad: abc\r\n"  # a head of a length that is not a multiple of 4
    assert len(raw_request(image(0), pad)) % 4
    with connect(cnn_server) as sock:
        for seed in range(2):  # the plan, then the binding
            check_cnn(models.cnn, image(seed), infer(sock, raw_request(image(seed), pad)))
        xs = [image(seed) for seed in range(10, 16)]
        sock.sendall(b"".join(raw_request(x, pad) for x in xs))
        for x in xs:
            check_cnn(models.cnn, x, read_response(sock))
    assert counted["bound"] >= 1


def test_a_binding_is_not_run_on_a_misaligned_body(models: Models) -> None:
    runner = OnnxRunner(models.cnn, threads=1)
    x = image(0)
    plan = RawPlan("image", x.dtype, x.shape, x.nbytes, RAW_TYPE)
    answer = RawAnswer("probabilities", np.dtype(np.float32), (1, 10), 40, b"head")
    model = ActiveModel("cnn", "1", "0" * 64, "onnx", models.cnn, runner, 1, 0, 0, 0)
    bound = model.bound(1, plan, answer)
    assert bound is not None
    assert model.bound(1, plan, answer) is bound  # kept for its owner
    buffer, at = aligned(x.nbytes + 4)
    buffer[2 : 2 + x.nbytes] = np.frombuffer(x.tobytes(), np.uint8)
    assert not bound.run(at + 2)  # not aligned for float32: the general path's to run
    buffer[: x.nbytes] = np.frombuffer(x.tobytes(), np.uint8)
    assert bound.run(at)
    want = ort_run(models.cnn, {"image": x})["probabilities"]
    np.testing.assert_allclose(
        np.frombuffer(bound.payload, np.float32).reshape(1, 10), want, rtol=1e-6, atol=1e-7
    )


def test_outputs_whose_shape_depends_on_the_data(tmp_path: Path, counted: Counter) -> None:
    """A binding made for one length of answer fails on another: the request is answered
    the general way, right, and the plan runs unbound from then on."""
    path = tmp_path / "positives.onnx"
    path.write_bytes(build_positives_model())
    inputs = [
        np.array([1, -1, 2, -2, 3, -3, 0, 0], np.float32),
        np.array([1, -1, 2, -2, 3, -3, 4, 0], np.float32),  # a binding for 3 fails on 4
        np.array([5, 6, 7, 0, 0, 0, 0, 0], np.float32),
        np.ones(8, np.float32),
    ]
    with (
        running(settings_for(tmp_path, path, model_name="positives")) as server,
        connect(server) as sock,
    ):
        for x in inputs + inputs:
            status, headers, body = infer(sock, raw_request(x))
            assert status == 200, body
            want = ort_run(path, {"x": x})["where"]
            assert headers["x-tensor-shape"] == ",".join(map(str, want.shape))
            assert np.frombuffer(body, np.int64).tolist() == want.ravel().tolist()
        model = server.current
        assert model is not None
        ((plan),) = model.raw_plans.values()
        assert not plan.bindable
    assert counted == {"bound": 1, "replayed": 0}  # the one that failed, then none


def test_a_model_error_keeps_the_binding(
    models: Models, tmp_path: Path, counted: Counter, capfd: pytest.CaptureFixture[str]
) -> None:
    """A run that fails in the runtime whatever the path (an index out of the table) is
    the model's 500, not the binding's fault: the next good request runs bound again.
    The bound attempt is quiet: onnxruntime logs the error once, from the general run."""

    def lookup(index: int) -> bytes:
        return raw_request(np.array([index], np.int64))

    with (
        running(settings_for(tmp_path, models.lookup, model_name="lookup")) as server,
        connect(server) as sock,
    ):
        for index in (3, 4):
            status, _, body = infer(sock, lookup(index))
            assert (status, np.frombuffer(body, np.float32).tolist()) == (
                200,
                [4.0 * index + k for k in range(4)],
            )
        capfd.readouterr()
        status, _, body = infer(sock, lookup(99))
        assert status == 500
        assert b"inference_failed" in body
        assert capfd.readouterr().err.count("indices element out of data bounds") == 1
        bound = counted["bound"]
        status, _, body = infer(sock, lookup(5))
        assert (status, np.frombuffer(body, np.float32).tolist()) == (200, [20.0, 21, 22, 23])
        assert counted["bound"] == bound + 1


def test_a_swap_lets_the_old_version_go_while_a_connection_idles(
    models: Models, tmp_path: Path, counted: Counter
) -> None:
    """A connection's binding belongs to the version: once swapped out, the old version
    (its session, its bindings) is freed although the connection stays open and idle;
    the same head then runs on the new version."""
    with (
        Origin() as origin,
        running(settings_for(tmp_path, models.cnn)) as server,
        connect(server) as sock,
    ):
        for seed in range(3):
            check_cnn(models.cnn, image(seed), infer(sock, raw_request(image(seed))))
        old = server.current
        assert old is not None
        assert old.bindings
        gone = weakref.ref(old)
        del old
        blob = models.bytes("cnn_v2")
        swap = {
            "model_url": origin.add("cnn-v2", blob),
            "sha256": sha256(blob),
            "model_version": "2",
        }
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post("/v1/admin/swap", json=swap).status_code == 200
        gc.collect()
        assert wait_for(lambda: gc.collect() >= 0 and gone() is None)
        for seed in range(4):
            answer = infer(sock, raw_request(image(seed)))
            assert answer[1]["x-model-version"] == "2"
            check_cnn(models.cnn_v2, image(seed), answer)


def test_draining_answers_a_replayed_head_as_any_other(
    cnn_server: InferenceServer, counted: Counter
) -> None:
    """A server being replaced answers (a handover loses no request) and closes, so the
    client reconnects to the version that replaces it."""
    with connect(cnn_server) as sock:
        for seed in range(3):
            assert infer(sock, raw_request(image(seed)))[0] == 200
        cnn_server.state = "draining"  # (what shutdown() does first)
        status, headers, body = infer(sock, raw_request(image(9)))
        assert (status, headers["connection"]) == (200, "close"), body
        assert closed(sock)
        cnn_server.state = "ready"


def test_a_replayed_head_with_a_short_body_is_400(
    cnn_server: InferenceServer, counted: Counter
) -> None:
    with connect(cnn_server) as sock:
        for seed in range(3):
            assert infer(sock, raw_request(image(seed)))[0] == 200
        sock.sendall(raw_request(image(4))[:-100])
        sock.shutdown(socket.SHUT_WR)
        status, headers, body = read_response(sock)
        assert (status, headers["connection"]) == (400, "close")
        assert b"the body ended before Content-Length" in body
    assert counted["replayed"] == 2


def test_expect_100_continue_is_answered_every_time(
    cnn_server: InferenceServer, models: Models, counted: Counter
) -> None:
    """A head with Expect is never replayed: each one gets its 100 Continue before the
    client sends the body."""
    with connect(cnn_server) as sock:
        for seed in range(4):
            x = image(seed)
            request = raw_request(x, "Expect: 100-continue\r\n")
            head, body = request[: -x.nbytes], request[-x.nbytes :]
            sock.sendall(head)
            assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            check_cnn(models.cnn, x, read_response(sock))
    assert counted["replayed"] == 0


def test_tflite_runs_unbound(models: Models, tmp_path: Path) -> None:
    """LiteRT has no binding: its raw requests take the plan's path, answered right."""
    with running(settings_for(tmp_path, models.mlp, model_name="mlp")) as server:
        model = server.current
        assert model is not None
        (spec,) = model.runner.inputs
        shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
        with connect(server) as sock:
            for seed in range(3):
                x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
                status, _, body = infer(sock, raw_request(x))
                assert status == 200, body
                (want,) = model.runner.run({spec.name: x}).values()
                np.testing.assert_allclose(np.frombuffer(body, want.dtype), want.ravel())
        assert not model.bindings


def test_a_model_that_echoes_its_input_is_answered_right(tmp_path: Path, counted: Counter) -> None:
    path = tmp_path / "echo.onnx"
    path.write_bytes(build_echo_model())
    with (
        running(settings_for(tmp_path, path, model_name="echo")) as server,
        connect(server) as sock,
    ):
        for k in range(5):
            x = np.arange(4, dtype=np.float32) + 1000 * k
            status, _, body = infer(sock, raw_request(x))
            assert status == 200, body
            assert np.frombuffer(body, np.float32).tolist() == x.tolist()
    assert counted["bound"] == 0


def test_a_client_alternating_header_sets_keeps_a_binding_for_each(
    cnn_server: InferenceServer, models: Models, counted: Counter, bindings_made: list[str]
) -> None:
    with connect(cnn_server) as sock:
        for seed in range(12):
            x = image(seed)
            extra = "Accept: application/octet-stream\r\n" if seed % 2 else ""  # two plans
            check_cnn(models.cnn, x, infer(sock, raw_request(x, extra)))
    assert len(bindings_made) == 2
    assert counted["bound"] == 12 - 2  # each set's first request makes its plan


def test_bindings_stay_within_the_versions_budget(
    cnn_server: InferenceServer,
    models: Models,
    counted: Counter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the budget for output arrays, a connection runs unbound (answered right);
    a connection that closes gives its share back."""
    monkeypatch.setattr(model_module, "BOUND_BYTES", 40)  # one (1, 10) float32 answer
    model = cnn_server.current
    assert model is not None
    with connect(cnn_server) as first:
        for seed in range(3):
            check_cnn(models.cnn, image(seed), infer(first, raw_request(image(seed))))
        assert model.bound_bytes == 40
        bound = counted["bound"]
        with connect(cnn_server) as second:
            for seed in range(3):
                check_cnn(models.cnn, image(seed), infer(second, raw_request(image(seed))))
        assert counted["bound"] == bound  # the second one ran unbound
    assert wait_for(lambda: model.bound_bytes == 0 and not model.bindings)
