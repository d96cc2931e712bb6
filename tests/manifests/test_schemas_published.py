"""The committed ``schemas/*.json`` are exactly what the code generates, and accept the
documented examples. After a change of a manifest kind's model (``controller/kit/manifest.py``,
``controller/{fleet,registry,rollouts}/spec.py``), run ``python scripts/gen_schemas.py`` and
commit the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from controller.manifests.schemas import KINDS
from controller.manifests.service import json_schema
from tests.manifests.examples import ROOT, design_rollout, readme_docs

SCHEMAS = ROOT / "schemas"
SCRIPT = ROOT / "scripts" / "gen_schemas.py"


def published(kind: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    assert isinstance(schema, dict)
    return schema


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_committed_schema_equals_the_generated_one(kind: str) -> None:
    expected = json.dumps(json_schema(kind), sort_keys=True, indent=2) + "\n"
    assert (SCHEMAS / f"{kind}.json").read_text() == expected, (
        f"schemas/{kind}.json is stale: run python scripts/gen_schemas.py"
    )


def test_schemas_directory_holds_one_file_per_kind() -> None:
    assert sorted(p.name for p in SCHEMAS.iterdir()) == sorted(f"{k}.json" for k in KINDS)


def test_script_check_passes_and_regenerates_identical_files(tmp_path: Path) -> None:
    check = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr

    (tmp_path / "Obsolete.json").write_text("{}\n")
    (tmp_path / "Rollout.json").write_text("{}\n")
    stale = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert stale.returncode == 1
    assert "out of date" in stale.stdout
    assert "Obsolete.json" in stale.stdout

    wrote = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrote.returncode == 0, wrote.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.json" for k in KINDS)
    for kind in KINDS:
        assert (tmp_path / f"{kind}.json").read_bytes() == (SCHEMAS / f"{kind}.json").read_bytes()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_published_schema_is_valid_draft_2020_12(kind: str) -> None:
    schema = published(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["kind"]["const"] == kind


def test_design_example_validates_against_the_published_rollout_schema() -> None:
    validator = jsonschema.Draft202012Validator(published("Rollout"))
    example = design_rollout()
    assert list(validator.iter_errors(example)) == []
    example["spec"]["gates"]["minHealthRatio"] = 0.95  # a typo is an error
    errors = list(validator.iter_errors(example))
    assert [list(e.absolute_path) for e in errors] == [["spec", "gates"]]


def test_readme_examples_validate_against_their_published_schemas() -> None:
    docs = readme_docs()
    assert [d["kind"] for d in docs] == ["Cluster", "ModelVersion", "Rollout"]
    for doc in docs:
        validator = jsonschema.Draft202012Validator(published(doc["kind"]))
        assert list(validator.iter_errors(doc)) == [], doc["kind"]


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        pytest.param(
            "Rollout",
            {**design_rollout(), "apiVersion": "edgefleet.io/v2"},
            id="rollout-apiVersion",
        ),
        pytest.param("Rollout", {**design_rollout(), "kind": "Cluster"}, id="rollout-kind"),
        pytest.param(
            "Cluster",
            {
                "apiVersion": "edgefleet.io/v1",
                "kind": "Cluster",
                "metadata": {"name": "berlin"},
                "spec": {"driver": "docker"},
            },
            id="cluster-driver",
        ),
        pytest.param(
            "ModelVersion",
            {
                "apiVersion": "edgefleet.io/v1",
                "kind": "ModelVersion",
                "metadata": {"name": "Detector"},
                "spec": {"model": "detector", "version": "1", "artifact": {"sha256": "x"}},
            },
            id="modelversion-name-and-sha256",
        ),
    ],
)
def test_published_schemas_reject_what_the_api_rejects(kind: str, doc: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(published(kind))
    assert list(validator.iter_errors(doc)) != []
