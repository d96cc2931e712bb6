"""The ``Cluster`` manifest: which driver reaches the cluster (a Kubernetes API server,
a simulated fleet, or local processes), and with which credentials.

A Kubernetes cluster is reached in one of two modes. ``push`` (the default): the
controller calls the cluster's API server with the credentials given here. ``pull``: the
cluster's own edgefleet agent (``edgefleet-agent cluster``) dials out to the controller,
fetches the desired state and applies it with its in-cluster identity; the controller
never connects to the cluster and holds no credentials for it, so a pull cluster names
neither ``server`` nor ``credentials`` (sites behind NAT or an outbound-only firewall)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from controller.kit.durations import parse_duration
from controller.kit.manifest import (
    Document,
    Duration,
    LabelKey,
    LabelValue,
    Name,
    Quantity,
    Strict,
    check_quantity,
)
from controller.kube.kubeconfig import (
    MAX_KUBECONFIG_BYTES,
    KubeconfigRefused,
    canonical_server,
    parse_kubeconfig,
)

Runtime = Literal["onnx", "tflite"]


class NodeTemplate(Strict):
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    cpu: Quantity = "4"
    memory: Quantity = "8Gi"
    architecture: Literal["amd64", "arm64", "arm"] = "amd64"
    runtimes: list[Runtime] = Field(default_factory=lambda: list[Runtime](["onnx", "tflite"]))

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | int | float) -> str:
        return check_quantity(v)


class SimulatedNode(NodeTemplate):
    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")]


class SimulatedFleet(Strict):
    """Nodes of a simulated cluster: listed one by one, or ``count`` copies of a
    template named ``<prefix>-<i>``, or both."""

    nodes: list[SimulatedNode] = Field(default_factory=list)
    count: int = Field(0, ge=0, le=200_000)
    prefix: Name = "node"
    template: NodeTemplate | None = None
    # Pod failures to inject, by node name or "*": e.g. {"edge-3": "ImagePullBackOff"}.
    failures: dict[str, str] = Field(default_factory=dict)
    # Container restarts to report, by node name: {"edge-3": 2}.
    restarts: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    applyLatency: Duration = Field("0s", description="how long each apply call takes")

    @field_validator("applyLatency")
    @classmethod
    def _latency(cls, v: str) -> str:
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _unique(self) -> SimulatedFleet:
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate node names: {', '.join(dupes)}")
        return self


class LocalFleet(SimulatedFleet):
    """Nodes of a ``local`` cluster: each runs its workloads as edgefleet-serve processes
    on this machine, node i listening on 127.0.0.1:(basePort + i)."""

    basePort: int = Field(18500, ge=1024, le=65000)
    cacheDir: str = "/tmp/edgefleet-local"


class ClusterCredentials(Strict):
    token: str | None = Field(
        None, max_length=16384, description="bearer token of the controller's identity"
    )
    caData: str | None = Field(
        None, max_length=65536, description="PEM CA bundle of the API server (or its base64)"
    )
    kubeconfig: str | None = Field(
        None,
        max_length=MAX_KUBECONFIG_BYTES,
        description="a kubeconfig (YAML) with inline credentials only: server, "
        "certificate-authority-data, token or client-certificate-data and client-key-data; "
        "exec, auth-provider and file paths are refused",
    )
    insecureSkipTLSVerify: bool = Field(
        False,
        description="only where the controller allows it (EDGEFLEET_CLUSTER_ALLOW_INSECURE_TLS)",
    )

    @field_validator("kubeconfig")
    @classmethod
    def _safe_kubeconfig(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_kubeconfig(v)
            except KubeconfigRefused as exc:
                raise ValueError(f"kubeconfig: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_way(self) -> ClusterCredentials:
        if self.token is None and self.kubeconfig is None:
            raise ValueError("give either token (with server and caData) or kubeconfig")
        return self


class ClusterSpec(Strict):
    driver: Literal["kubernetes", "simulated", "local"]
    mode: Literal["push", "pull"] = Field(
        "push",
        description="push: the controller calls the cluster's API server; pull: the cluster's "
        "agent (edgefleet-agent cluster) fetches the desired state from the controller, and "
        "the controller stores no server address or credentials (driver kubernetes only)",
    )
    server: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] | None = None
    namespace: Name = "edgefleet-workloads"
    credentials: ClusterCredentials | None = None
    simulated: SimulatedFleet | None = None
    local: LocalFleet | None = None

    @field_validator("server")
    @classmethod
    def _server(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                canonical_server(v)
            except KubeconfigRefused as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _driver_fields(self) -> ClusterSpec:
        if self.driver == "simulated" and self.simulated is None:
            raise ValueError("driver 'simulated' needs a 'simulated' section (nodes or count)")
        if self.driver == "local" and self.local is None:
            raise ValueError("driver 'local' needs a 'local' section (nodes or count)")
        if self.mode == "pull":
            if self.driver != "kubernetes":
                raise ValueError("mode 'pull' is for driver 'kubernetes' only")
            if self.server is not None or self.credentials is not None:
                raise ValueError(
                    "a cluster in mode 'pull' has no server or credentials: its own agent "
                    "connects to the controller (remove spec.server and spec.credentials)"
                )
        elif self.driver == "kubernetes":
            if self.credentials is None:
                raise ValueError("driver 'kubernetes' needs credentials (token or kubeconfig)")
            if self.server is None and self.credentials.kubeconfig is None:
                raise ValueError("driver 'kubernetes' needs server (or a kubeconfig)")
        return self


class ClusterManifest(Document):
    kind: Literal["Cluster"]
    spec: ClusterSpec
