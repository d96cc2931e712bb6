"""The envelope every manifest kind shares (apiVersion ``edgefleet.io/v1``, kind,
metadata, spec) and the field types the kinds have in common. Unknown fields are errors
everywhere; each error names its field path and the expected form. Each domain declares
its own kind on top of :class:`Document` (``fleet/spec.py``, ``registry/spec.py``,
``rollouts/spec.py``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from controller.kit.quantity import parse_quantity

API_VERSION = "edgefleet.io/v1"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
VERSION = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
# Kubernetes label keys: optional DNS-subdomain prefix, then a name segment.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(|[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"

Name = Annotated[str, StringConstraints(pattern=DNS_LABEL)]
Version = Annotated[str, StringConstraints(pattern=VERSION)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE)]
Quantity = Annotated[str | int | float, Field(description="Kubernetes quantity: 250m, 1, 512Mi")]
Duration = Annotated[str, Field(description="duration: 30s, 10m, 1h30m")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ObjectMeta(Strict):
    name: Name = Field(description="DNS-1123 label: lowercase letters, digits and '-'")
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Document(Strict):
    """A manifest of some kind. Each kind narrows ``kind`` to its name and ``spec`` to
    its own model; the fields keep this order (their JSON Schemas list them so)."""

    apiVersion: Literal["edgefleet.io/v1"]
    kind: str
    metadata: ObjectMeta
    spec: Any


def check_quantity(value: str | int | float) -> str:
    if parse_quantity(value) < 0:
        raise ValueError(f"{value!r} is negative: resource quantities must be >= 0")
    return str(value)
