from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controller.db.models import Model, ModelVersion
from controller.errors import InvalidInput

# Model names and versions end up in Kubernetes label values and object names, so they
# follow those rules: names are DNS-1123 labels, versions are label values.
MODEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
VERSION = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def check_model_name(name: str, loc: tuple[str | int, ...] = ("path", "name")) -> str:
    if not MODEL_NAME.match(name):
        raise InvalidInput(
            f"invalid model name {name!r}: expected a DNS-1123 label (lowercase letters, "
            "digits and '-', 1-63 characters, starting and ending with a letter or digit)",
            loc=loc,
        )
    return name


def check_version(version: str, loc: tuple[str | int, ...] = ("body", "version")) -> str:
    if not VERSION.match(version):
        raise InvalidInput(
            f"invalid version {version!r}: expected 1-63 characters of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit (e.g. 2.1.0)",
            loc=loc,
        )
    return version


class ModelVersionOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    model: str
    version: str
    format: str
    sha256: str
    size_bytes: int
    status: str
    status_message: str | None
    signature: dict[str, Any]
    metadata: dict[str, Any]
    validation: dict[str, Any] | None
    benchmark: dict[str, Any] | None
    parent: str | None = None
    lineage: dict[str, Any] | None = None
    artifact_url: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, mv: ModelVersion, model_name: str) -> ModelVersionOut:
        return cls(
            model=model_name,
            version=mv.version,
            format=mv.format,
            sha256=mv.sha256,
            size_bytes=mv.size_bytes,
            status=mv.status,
            status_message=mv.status_message,
            signature=mv.signature,
            metadata=mv.meta,
            validation=mv.validation,
            benchmark=mv.benchmark,
            parent=(mv.lineage or {}).get("parent"),
            lineage=mv.lineage,
            artifact_url=f"/v1/models/{model_name}/versions/{mv.version}/artifact",
            created_at=mv.created_at,
            updated_at=mv.updated_at,
        )


class ModelOut(BaseModel):
    name: str
    description: str | None
    version_count: int
    latest_version: str | None
    created_at: datetime

    @classmethod
    def of(cls, model: Model, counts: tuple[int, str | None]) -> ModelOut:
        return cls(
            name=model.name,
            description=model.description,
            version_count=counts[0],
            latest_version=counts[1],
            created_at=model.created_at,
        )


class PushMetadata(BaseModel):
    """The optional ``metadata`` form field of a push: free-form labels plus hints that
    help the validation probe build inputs for dynamic shapes."""

    model_config = ConfigDict(extra="allow")

    description: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    validation: ValidationHints | None = None


class ValidationHints(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dims: dict[str, int] = Field(default_factory=dict, description="named dynamic dim → size")
    shapes: dict[str, list[int]] = Field(default_factory=dict, description="input → shape")
    values: dict[str, Any] = Field(default_factory=dict, description="input → constant value")


PushMetadata.model_rebuild()
