"""The manifest kinds: ``Cluster``, ``ModelVersion``, ``Rollout`` (apiVersion
``edgefleet.io/v1``). Unknown fields are errors everywhere; each error names its field
path and the expected form. ``scripts/gen_schemas.py`` writes their JSON Schemas to
``schemas/`` and the API serves them at ``/v1/schemas/{kind}``."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from controller.kube.kubeconfig import (
    MAX_KUBECONFIG_BYTES,
    KubeconfigRefused,
    canonical_server,
    parse_kubeconfig,
)
from controller.kube.quantity import parse_quantity
from controller.rollouts.durations import parse_duration

API_VERSION = "edgefleet.io/v1"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
VERSION = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
# Kubernetes label keys: optional DNS-subdomain prefix, then a name segment.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(|[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"

Name = Annotated[str, StringConstraints(pattern=DNS_LABEL)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ObjectMeta(Strict):
    name: Name = Field(description="DNS-1123 label: lowercase letters, digits and '-'")
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


def _check_quantity(value: str | int | float) -> str:
    if parse_quantity(value) < 0:
        raise ValueError(f"{value!r} is negative: resource quantities must be >= 0")
    return str(value)


Quantity = Annotated[str | int | float, Field(description="Kubernetes quantity: 250m, 1, 512Mi")]


class ResourceList(Strict):
    cpu: Quantity | None = None
    memory: Quantity | None = None

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | int | float | None) -> str | None:
        return None if v is None else _check_quantity(v)


class Resources(Strict):
    requests: ResourceList = Field(default_factory=ResourceList)
    limits: ResourceList = Field(default_factory=ResourceList)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        for field in ("cpu", "memory"):
            req, lim = getattr(self.requests, field), getattr(self.limits, field)
            if req is not None and lim is not None and parse_quantity(req) > parse_quantity(lim):
                raise ValueError(f"requests.{field} ({req}) must not exceed limits.{field} ({lim})")
        return self


# ---------------------------------------------------------------- Cluster


Runtime = Literal["onnx", "tflite"]
Duration = Annotated[str, Field(description="duration: 30s, 10m, 1h30m")]


class NodeTemplate(Strict):
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    cpu: Quantity = "4"
    memory: Quantity = "8Gi"
    architecture: Literal["amd64", "arm64", "arm"] = "amd64"
    runtimes: list[Runtime] = Field(default_factory=lambda: list[Runtime](["onnx", "tflite"]))

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | int | float) -> str:
        return _check_quantity(v)


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
        if self.driver == "kubernetes":
            if self.credentials is None:
                raise ValueError("driver 'kubernetes' needs credentials (token or kubeconfig)")
            if self.server is None and self.credentials.kubeconfig is None:
                raise ValueError("driver 'kubernetes' needs server (or a kubeconfig)")
        return self


class ClusterManifest(Strict):
    apiVersion: Literal["edgefleet.io/v1"]
    kind: Literal["Cluster"]
    metadata: ObjectMeta
    spec: ClusterSpec


# ---------------------------------------------------------------- ModelVersion


class ArtifactRef(Strict):
    sha256: Sha256 | None = None
    path: str | None = Field(None, description="local file; `edgefleet apply` uploads it")

    @model_validator(mode="after")
    def _exactly_one(self) -> ArtifactRef:
        if (self.sha256 is None) == (self.path is None):
            raise ValueError("give exactly one of sha256 or path")
        return self


class ValidationHints(Strict):
    dims: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    shapes: dict[str, list[Annotated[int, Field(ge=0)]]] = Field(default_factory=dict)
    values: dict[str, Any] = Field(default_factory=dict)


class ModelVersionSpec(Strict):
    model: Name
    version: Annotated[str, StringConstraints(pattern=VERSION)]
    artifact: ArtifactRef
    description: str | None = None
    validation: ValidationHints | None = None


class ModelVersionManifest(Strict):
    apiVersion: Literal["edgefleet.io/v1"]
    kind: Literal["ModelVersion"]
    metadata: ObjectMeta
    spec: ModelVersionSpec


# ---------------------------------------------------------------- Rollout

_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")


def _int_or_percent(value: object) -> int | str:
    """One error at the field itself (not one per branch of an int | str union)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _PERCENT.match(value):
        return value
    raise ValueError(
        f"expected a node count (an integer >= 0) or a percentage from '0%' to '100%', "
        f"got {value!r}"
    )


def _at_least_one(value: object) -> int | str:
    if value in (0, "0%") or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
        raise ValueError(
            f"must allow at least one node: an integer >= 1 or a percentage above 0%, got {value!r}"
        )
    return _int_or_percent(value)


IntOrPercent = Annotated[
    int | str,
    BeforeValidator(_int_or_percent),
    Field(description="a node count (int >= 0) or a percentage string like '10%'"),
]
PositiveIntOrPercent = Annotated[
    int | str,
    BeforeValidator(_at_least_one),
    Field(description="a node count (int >= 1) or a percentage string like '10%'"),
]


class ModelRef(Strict):
    name: Name
    version: Annotated[str, StringConstraints(pattern=VERSION)]
    variants: Literal["auto"] | list[Annotated[str, StringConstraints(pattern=VERSION)]] | None = (
        Field(
            None,
            description="Let the controller pick, per node class, the fastest of this version "
            "and these variants that its on-node benchmarks show within the gates (p95) and the "
            "memory limit, and that meet spec.comparison; 'auto': every Ready variant derived "
            "from the version. A class without such a benchmark gets the version itself.",
        )
    )

    @field_validator("variants")
    @classmethod
    def _distinct(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one variant, or 'auto', or leave it out")
            if len(set(v)) != len(v):
                raise ValueError("variants must be distinct")
            if info.data.get("version") in v:
                raise ValueError("the version itself is always a candidate: list variants only")
        return v


class Requirement(Strict):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values(self) -> Requirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class Selector(Strict):
    matchLabels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    matchExpressions: list[Requirement] = Field(default_factory=list)
    clusters: list[Name] = Field(
        default_factory=list, description="only nodes of these clusters (default: all)"
    )


class Step(Strict):
    nodes: int | None = Field(None, ge=1, description="cumulative node count after this step")
    percent: int | None = Field(None, ge=1, le=100, description="cumulative percentage")
    bake: Duration = "0s"

    @field_validator("bake")
    @classmethod
    def _bake(cls, v: str) -> str:
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _one_size(self) -> Step:
        if (self.nodes is None) == (self.percent is None):
            raise ValueError("give exactly one of nodes or percent")
        return self


class Strategy(Strict):
    steps: list[Step] = Field(min_length=1, max_length=100)
    maxUnavailable: PositiveIntOrPercent = "25%"
    maxDeferred: IntOrPercent = Field(
        "10%", description="offline nodes a wave may defer before the rollout fails"
    )
    progressDeadline: Duration = "15m"

    @field_validator("progressDeadline")
    @classmethod
    def _deadline(cls, v: str) -> str:
        if parse_duration(v) <= 0:
            raise ValueError("must be longer than 0s")
        return v


class Gates(Strict):
    maxP95LatencyMs: float | None = Field(None, gt=0)
    maxErrorRate: float | None = Field(None, ge=0, le=1)
    minHealthyRatio: float = Field(1.0, ge=0, le=1)
    minSamples: int = Field(20, ge=1, description="inferences a node must report to count")


class ComparisonRequirement(Strict):
    """Limits on a derived variant's comparison report (how close it stays to its parent)."""

    minAgreement: float | None = Field(None, ge=0, le=1, description="top-1 agreement")
    maxAbsError: float | None = Field(None, ge=0, description="max absolute output error")


class RolloutSpec(Strict):
    model: ModelRef
    selector: Selector
    resources: Resources = Field(default_factory=Resources)
    strategy: Strategy
    gates: Gates = Field(default_factory=Gates)
    onFailure: Literal["rollback", "pause"] = "rollback"
    comparison: ComparisonRequirement | None = None


class RolloutManifest(Strict):
    apiVersion: Literal["edgefleet.io/v1"]
    kind: Literal["Rollout"]
    metadata: ObjectMeta
    spec: RolloutSpec


KINDS: dict[str, type[Strict]] = {
    "Cluster": ClusterManifest,
    "ModelVersion": ModelVersionManifest,
    "Rollout": RolloutManifest,
}

PERCENT = re.compile(r"^(\d+)%$")
