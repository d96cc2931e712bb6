"""The simulated driver: clusters and nodes that exist only as data, for the demo, the
benchmarks and the tests. Node inventory comes from the Cluster manifest; what runs on
each node is kept in Redis when the controller has one (so every API replica, worker and
test process sees the same fleet) and in process memory in the embedded setup.

Behaviour: an applied workload is Ready at once, unless a failure is injected for the
node (``failures: {node-or-*: reason}``), in which case it is Failed with that reason."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from controller.kit.durations import parse_duration
from controller.kube.driver import NodeInventory, ObservedWorkload, WorkloadSpec


class SimState(Protocol):
    def get_all(self, key: str) -> dict[str, str]: ...

    def put(self, key: str, values: Mapping[str, str]) -> None: ...

    def delete(self, key: str, fields: Sequence[str]) -> None: ...


class LocalState:
    _data: dict[str, dict[str, str]] = {}
    _lock = threading.Lock()

    def get_all(self, key: str) -> dict[str, str]:
        with self._lock:
            return dict(self._data.get(key, {}))

    def put(self, key: str, values: Mapping[str, str]) -> None:
        with self._lock:
            self._data.setdefault(key, {}).update(values)

    def delete(self, key: str, fields: Sequence[str]) -> None:
        with self._lock:
            bucket = self._data.get(key, {})
            for f in fields:
                bucket.pop(f, None)


class RedisState:
    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, decode_responses=True)

    def get_all(self, key: str) -> dict[str, str]:
        result: dict[str, str] = self._redis.hgetall(key)
        return result

    def put(self, key: str, values: Mapping[str, str]) -> None:
        if values:
            mapping: dict[str | bytes, str] = dict(values.items())
            self._redis.hset(key, mapping=mapping)

    def delete(self, key: str, fields: Sequence[str]) -> None:
        if fields:
            self._redis.hdel(key, *fields)


def expand_nodes(spec: Mapping[str, Any]) -> list[NodeInventory]:
    """The node inventory a ``simulated`` section describes."""
    out: list[NodeInventory] = []

    def add(node: Mapping[str, Any], name: str) -> None:
        arch = node.get("architecture", "amd64")
        resources = {"cpu": str(node.get("cpu", "4")), "memory": str(node.get("memory", "8Gi"))}
        labels = {"kubernetes.io/arch": arch, "kubernetes.io/hostname": name}
        labels.update(node.get("labels") or {})
        out.append(
            NodeInventory(
                name=name,
                labels=labels,
                architecture=arch,
                capacity=resources,
                allocatable=resources,
                ready=True,
                runtimes=tuple(node.get("runtimes") or ("onnx", "tflite")),
            )
        )

    for node in spec.get("nodes") or []:
        add(node, node["name"])
    template = spec.get("template") or {}
    for i in range(int(spec.get("count") or 0)):
        add(template, f"{spec.get('prefix', 'node')}-{i}")
    return out


class SimulatedDriver:
    def __init__(
        self, cluster: str, spec: Mapping[str, Any], state: SimState, prefix: str = "edgefleet:sim"
    ) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self._spec = spec
        self._state = state
        self._failures: Mapping[str, str] = spec.get("failures") or {}
        self._restarts: Mapping[str, int] = spec.get("restarts") or {}
        self._latency_s = parse_duration(str(spec.get("applyLatency") or "0s"))

    def _key(self, model: str) -> str:
        return f"{self.prefix}:{self.cluster}:{model}"

    def check(self) -> None:
        return None

    def list_nodes(self) -> list[NodeInventory]:
        return expand_nodes(self._spec)

    def apply(self, model: str, desired: Mapping[str, WorkloadSpec | None]) -> None:
        if self._latency_s and desired:
            time.sleep(self._latency_s)
        put = {n: json.dumps(w.as_dict()) for n, w in desired.items() if w is not None}
        self._state.put(self._key(model), put)
        self._state.delete(self._key(model), [n for n, w in desired.items() if w is None])

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]:
        running = self._state.get_all(self._key(model))
        out: dict[str, ObservedWorkload] = {}
        for node in nodes:
            raw = running.get(node)
            if raw is None:
                out[node] = ObservedWorkload("Absent")
                continue
            spec = json.loads(raw)
            reason = self._failures.get(node) or self._failures.get("*")
            phase = "Failed" if reason else "Ready"
            restarts = int(self._restarts.get(node, 0))
            out[node] = ObservedWorkload(phase, spec["version"], spec["sha256"], reason, restarts)
        return out
