"""Integer path and query parameters, bounded to what Postgres can compare them with.

Row ids and offsets are ``bigint``; a larger number given to Postgres fails there
(``bigint out of range``: a 500), so it is refused here as a 422 with its field path."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

BIGINT_MAX = 2**63 - 1

# A row's id in the URL (ids start at 1).
IdPath = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
OffsetQuery = Annotated[int, Query(ge=0, le=BIGINT_MAX)]
