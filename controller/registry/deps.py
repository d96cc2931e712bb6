"""The request dependencies of the routes that take uploads or serve artifacts (the
registry's, the optimizations', the manifests'): the artifact store."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from controller.registry.store import ArtifactStore, artifact_store
from controller.web.deps import SettingsDep


def get_store(settings: SettingsDep) -> ArtifactStore:
    return artifact_store(settings)


# The artifact store of a request.
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
