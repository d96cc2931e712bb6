"""The ``ModelVersion`` manifest: a version of a model and its artifact (a digest
already in the store, or a local file ``edgefleet apply`` uploads)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from controller.kit.manifest import Document, Name, Strict, Version

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


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
    version: Version
    artifact: ArtifactRef
    description: str | None = None
    validation: ValidationHints | None = None


class ModelVersionManifest(Document):
    kind: Literal["ModelVersion"]
    spec: ModelVersionSpec
