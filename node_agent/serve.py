"""``edgefleet-serve``: the inference server that runs one model workload on an edge node.

    edgefleet-serve --model-url URL --sha256 HEX --format onnx|tflite \\
        --model-name N --model-version V --cache-dir DIR --port P [--host H] [--threads T]
    edgefleet-serve --model-path model.onnx --port 8500          # a local file (dev, tests)

The listener starts first (``/healthz`` answers while the artifact downloads); the model
comes from the node-local cache when its bytes verify, else from the URL (resuming a
partial download); it is loaded, warmed up, and only then does ``/readyz`` turn 200.
Every flag may also come from ``EDGEFLEET_SERVE_<FLAG>``; ``--threads`` defaults to the
pod's CPU limit (``EDGEFLEET_CPU_LIMIT`` in millicores, rounded up), never the host's
core count. SIGTERM drains: readiness off, requests in flight finish, exit 0.

Exit codes: 0 stopped by a signal, 1 unexpected error or the port is taken, 2 bad
arguments, 3 the artifact does not match its sha256 (the bad file is deleted), 4 the
artifact could not be downloaded, 5 the runtime could not load or warm up the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import ValidationError

from node_agent.cache import ArtifactUnavailable, ChecksumMismatch
from node_agent.server.app import InferenceServer
from node_agent.server.model import ModelLoadError
from node_agent.server.settings import ServeSettings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHECKSUM = 3
EXIT_UNAVAILABLE = 4
EXIT_LOAD = 5

log = logging.getLogger("node_agent.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-serve",
        description="Serve one ONNX or TFLite model over HTTP (env: EDGEFLEET_SERVE_*).",
        argument_default=argparse.SUPPRESS,  # unset flags fall through to env / defaults
    )
    add = parser.add_argument
    add("--model-url", help="artifact URL (the controller's /v1/models/.../artifact)")
    add("--sha256", help="expected sha256 of the artifact (hex)")
    add("--format", choices=("onnx", "tflite"), help="model format (default: detected)")
    add("--model-path", help="serve a local model file instead of downloading one")
    add("--model-name", help="model name, for /v1/model and metrics")
    add("--model-version", help="model version, for /v1/model and metrics")
    add("--cache-dir", help="node-local artifact cache (default /var/lib/edgefleet/models)")
    add("--host", help="listen address (default 0.0.0.0)")
    add("--port", type=int, help="listen port (default 8500; 0 picks a free one)")
    add("--threads", type=int, help="intra-op threads (default: from EDGEFLEET_CPU_LIMIT)")
    add("--warmup-runs", type=int, help="inferences before readiness (default 3)")
    add(
        "--warmup-inputs",
        type=json.loads,
        help="JSON: the version's validation hints for the warm-up inputs, "
        'e.g. {"shapes": {"state": [2, 1, 128]}, "values": {"sr": 16000}}',
    )
    add("--max-body-bytes", type=int, help="request body limit (413 above)")
    add(
        "--busy-poll-us",
        type=int,
        help="poll for a client's next request this long after answering (default 250; 0 off)",
    )
    add("--shutdown-grace-s", type=float, help="SIGTERM: how long requests may finish")
    add("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return parser


def load_settings(argv: Sequence[str] | None) -> ServeSettings:
    parser = build_parser()
    overrides: dict[str, Any] = vars(parser.parse_args(argv))
    try:
        return ServeSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
            for err in exc.errors()
        )
        parser.error(problems)  # exits 2


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    server = InferenceServer(settings)
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        raise SystemExit(EXIT_ERROR) from exc

    stop = threading.Event()
    outcome = {"code": EXIT_OK}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def load() -> None:
        try:
            server.load()
        except ChecksumMismatch as exc:
            log.error("refusing to start: %s", exc)
            outcome["code"] = EXIT_CHECKSUM
        except ArtifactUnavailable as exc:
            log.error("refusing to start: the artifact is unavailable: %s", exc)
            outcome["code"] = EXIT_UNAVAILABLE
        except ModelLoadError as exc:
            log.error("refusing to start: %s", exc)
            outcome["code"] = EXIT_LOAD
        except Exception:
            log.exception("refusing to start: unexpected error while loading the model")
            outcome["code"] = EXIT_ERROR
        else:
            # What is alive now (the runtime, the model, the modules) lives as long as the
            # process: keep the cyclic collector from walking it again and again.
            gc.freeze()
            log.info("ready")
            return
        stop.set()

    threading.Thread(target=load, name="load", daemon=True).start()
    while not stop.wait(1.0):
        pass
    server.shutdown()
    raise SystemExit(outcome["code"])


if __name__ == "__main__":
    main()
