"""POST /v1/apply past its bounds: too many bytes (413), too many documents, values
nested too deep, a YAML alias bomb, a cycle, a repeated key (422s naming the problem
and its place). Every refusal stores nothing, and comes quickly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from controller.settings import Settings
from tests.manifests.test_apply import stored
from tests.rollouts.helpers import cluster_doc, rollout_doc

YAML = "application/yaml"
JSON = "application/json"


@pytest.fixture
def before(sim_fleet: None) -> Iterator[dict[str, int]]:
    """Row counts before the test; the test's refusal must leave them as they were."""
    counts = stored()
    yield counts
    assert stored() == counts


def post(client: TestClient, body: str | bytes, content_type: str = YAML) -> Any:
    return client.post("/v1/apply", content=body, headers={"content-type": content_type})


def refused(resp: Any, status: int = 422) -> dict[str, Any]:
    """The first error of a refusal, checked to be in our error shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    if status == 413:
        assert body["error"] == "payload_too_large"
        return {"loc": None, "msg": body["detail"]}
    assert body["error"] == "validation_error"
    first: dict[str, Any] = body["detail"][0]
    return first


def clusters(n: int) -> list[dict[str, Any]]:
    return [cluster_doc(f"c{i}", 1) for i in range(n)]


# --- size ----------------------------------------------------------------------------


def test_a_body_over_max_manifest_bytes_is_413(
    client: TestClient, settings: Settings, before: dict[str, int]
) -> None:
    body = yaml.safe_dump_all(clusters(100))
    old = settings.max_manifest_bytes
    settings.max_manifest_bytes = len(body) - 1
    try:
        error = refused(post(client, body), 413)
        assert post(client, body[: len(body) // 2].rpartition("---")[0]).status_code == 200
    finally:
        settings.max_manifest_bytes = old
    assert f"limit of {len(body) - 1} bytes (EDGEFLEET_MAX_MANIFEST_BYTES)" in error["msg"]
    before.update(stored())  # the half that fits was applied


def test_ten_thousand_documents_are_refused_at_once(
    client: TestClient, before: dict[str, int]
) -> None:
    """The documents of a stream are counted as they are parsed: the refusal comes after
    max_manifest_documents of them, not after parsing (or applying) 10,000. The same
    10,000 Rollouts (4.5 MiB) took over 30 s to parse alone before the bounds."""
    small = "---\nkind: Cluster\n" * 10_000  # 180 kB: under the size bound
    big = ("---\n" + yaml.safe_dump(rollout_doc("r", "1.0.0"))) * 10_000  # 4.5 MiB: over it

    # Past the 501st document, one that does not parse: a refusal for the count, not
    # the syntax error, shows that parsing stopped at the bound.
    error = refused(post(client, small + "---\nkind: [unclosed\n"))
    assert error["loc"] == ["body"]
    assert error["msg"] == (
        "more than 500 YAML documents in one request (EDGEFLEET_MAX_MANIFEST_DOCUMENTS)"
    )

    refused(post(client, big), 413)

    error = refused(post(client, json.dumps([{"kind": "Cluster"}] * 10_000), JSON))
    assert error["msg"] == (
        "10000 documents, more than the 500 one request may hold (EDGEFLEET_MAX_MANIFEST_DOCUMENTS)"
    )


def test_the_document_limit_is_a_setting(
    client: TestClient, settings: Settings, before: dict[str, int]
) -> None:
    old = settings.max_manifest_documents
    settings.max_manifest_documents = 2
    try:
        yaml_error = refused(post(client, yaml.safe_dump_all(clusters(3))))
        json_error = refused(post(client, json.dumps(clusters(3)), JSON))
        assert post(client, yaml.safe_dump_all(clusters(2))).status_code == 200
    finally:
        settings.max_manifest_documents = old
    assert "more than 2 YAML documents" in yaml_error["msg"]
    assert "3 documents, more than the 2" in json_error["msg"]
    before.update(stored())  # the two that fit were applied


# --- shape ---------------------------------------------------------------------------


def deep_yaml(levels: int) -> str:
    """A Cluster whose first node's labels hold a value nested ``levels`` deep."""
    doc = cluster_doc("deep", 1)
    doc["spec"]["simulated"]["nodes"][0]["labels"] = {"x": "@"}
    nest = "[" * levels + "]" * levels
    return yaml.safe_dump(doc, sort_keys=False).replace("'@'", nest)


DEEP_LOC = ["body", 0, "spec", "simulated", "nodes", 0, "labels", "x"]


def test_yaml_nested_too_deep_is_422_at_its_place(
    client: TestClient, before: dict[str, int]
) -> None:
    # The label's value is level 7 (under the document, spec, simulated, nodes, the
    # node and labels): its 59th [ is level 65, the first past the bound.
    error = refused(post(client, deep_yaml(60)))
    assert error["loc"] == [*DEEP_LOC, *[0] * 58]
    assert error["msg"] == (
        "nested more than 64 levels deep (EDGEFLEET_MAX_NESTING_DEPTH) at line 13, column 70"
    )


def test_yaml_nested_past_libyamls_own_limit_is_422(
    client: TestClient, before: dict[str, int]
) -> None:
    """libyaml scans up to 1024 characters ahead: 1000 ``[`` in a row meet its own limit
    before the composer counts them."""
    error = refused(post(client, deep_yaml(100_000)))
    assert error["loc"] == ["body"]
    assert error["msg"] == "not valid YAML at line 13, column 1007: exceeded maximum nesting depth"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param(
            "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x\n",
            ["body", 0, *[f"k{i}" for i in range(64)]],
            id="mappings",
        ),
        pytest.param("- " * 100_000 + "x\n", ["body", 0, *[0] * 64], id="sequences"),
    ],
)
def test_block_yaml_nested_too_deep_is_422(
    client: TestClient, before: dict[str, int], body: str, loc: list[str | int]
) -> None:
    error = refused(post(client, body))
    assert error["loc"] == loc
    assert "nested more than 64 levels deep" in error["msg"]


@pytest.mark.parametrize("levels", [70, 3000, 100_000])
def test_json_nested_too_deep_is_422(
    client: TestClient, before: dict[str, int], levels: int
) -> None:
    doc = cluster_doc("deep", 1)
    doc["spec"]["simulated"]["nodes"][0]["labels"] = {"x": "@"}
    body = json.dumps([doc]).replace('"@"', "[" * levels + "]" * levels)
    error = refused(post(client, body, JSON))
    assert "the body is nested more than 64 levels deep" in error["msg"]
    if levels == 70:  # parsed, then measured: the place is known
        assert error["loc"][: len(DEEP_LOC)] == DEEP_LOC
    else:  # deeper than the parser's stack: refused while parsing
        assert error["loc"] == ["body"]


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_billion_laughs_is_refused_unexpanded(client: TestClient, before: dict[str, int]) -> None:
    error = refused(post(client, BILLION_LAUGHS))
    # Refused at g, before h and i: counted as the aliases are met, never expanded.
    assert error["loc"] == ["body", 0, "g", 0]
    assert error["msg"] == (
        "more than 1000000 values, aliases counted as the values they repeat "
        "(EDGEFLEET_MAX_INPUT_NODES) at line 7, column 8"
    )


def test_aliases_within_the_budget_are_fine(client: TestClient, before: dict[str, int]) -> None:
    body = """\
apiVersion: edgefleet.io/v1
kind: Cluster
metadata: {name: aliased}
spec:
  driver: simulated
  simulated:
    nodes:
    - {name: aliased-n0, labels: &labels {tier: retail}}
    - {name: aliased-n1, labels: *labels}
"""
    resp = post(client, body)
    assert resp.status_code == 200, resp.text
    before.update(stored())


def test_a_recursive_alias_is_422(client: TestClient, before: dict[str, int]) -> None:
    error = refused(post(client, "apiVersion: edgefleet.io/v1\nkind: Cluster\nspec: &s {a: *s}\n"))
    assert error["loc"] == ["body", 0, "spec", "a"]
    assert error["msg"] == "alias *s refers to a node that contains it at line 3, column 14"


def test_a_repeated_yaml_key_names_the_key_and_its_lines(
    client: TestClient, before: dict[str, int]
) -> None:
    body = yaml.safe_dump(cluster_doc("paris", 1), sort_keys=False)
    body = body.replace("  name: paris\n", "  name: paris\n  name: berlin\n")
    first = yaml.safe_dump(cluster_doc("a", 1))
    error = refused(post(client, first + "---\n" + body))
    # Lines of the whole stream, as an editor shows them.
    line = first.count("\n") + 1 + 4
    assert error["loc"] == ["body", 1, "metadata", "name"]
    assert (
        error["msg"] == f"repeated key 'name' (first at line {line}) at line {line + 1}, column 3"
    )


def test_a_repeated_json_key_names_the_key_and_its_path(
    client: TestClient, before: dict[str, int]
) -> None:
    body = json.dumps(clusters(2)).replace('"name": "c1"', '"name": "c1", "name": "c2"')
    error = refused(post(client, body, JSON))
    assert error["loc"] == ["body", 1, "metadata", "name"]
    assert error["msg"] == "the body repeats the key 'name' in one object"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("2024-13-45", "month must be in 1..12"),
        ("1:" * 3000 + "1", "an integer longer than 4300 characters"),
    ],
)
def test_scalars_yaml_cannot_build_are_422(
    client: TestClient, before: dict[str, int], value: str, words: str
) -> None:
    error = refused(post(client, f"apiVersion: edgefleet.io/v1\nkind: Cluster\nwhen: {value}\n"))
    assert error["loc"] == ["body"]
    assert error["msg"] == f"not valid YAML at line 3, column 7: {words}"
