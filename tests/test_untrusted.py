"""JSON and YAML parsed within bounds: what each bound refuses, where it says the
problem is, and that YAML on libyaml's events and on the pure-Python parser agree."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import yaml

from controller.errors import InvalidInput
from controller.untrusted import _PyLoader, load_json, load_yaml_documents

LOADERS = [pytest.param(None, id="libyaml"), pytest.param(_PyLoader, id="python")]


def docs(
    text: str,
    loader: type[Any] | None,
    *,
    max_depth: int = 64,
    max_nodes: int = 1000,
    max_documents: int = 10,
) -> list[Any]:
    return load_yaml_documents(
        text,
        loader=loader,
        max_depth=max_depth,
        max_nodes=max_nodes,
        max_documents=max_documents,
    )


def refusal(text: str, loader: type[Any] | None, **bounds: int) -> tuple[list[Any], str]:
    with pytest.raises(InvalidInput) as info:
        docs(text, loader, **bounds)
    return list(info.value.loc), info.value.message


def test_libyaml_is_used() -> None:
    """PyYAML's wheels carry libyaml, and the bounded loader must use it (a 4 MiB
    manifest parses 4x faster): a PyYAML without it is a broken install, not a skip."""
    from controller.untrusted import _Loader

    assert yaml.__with_libyaml__
    assert _Loader is not _PyLoader


@pytest.mark.parametrize("loader", LOADERS)
def test_yaml_within_the_bounds_is_what_safe_load_gives(loader: type[Any] | None) -> None:
    text = """\
base: &base {tier: retail, site: paris}
node: {<<: *base, site: berlin}
list: [1, 0x10, 1:30, 2024-01-02, ~, yes]
---
---
second: document
"""
    assert docs(text, loader) == [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.mark.parametrize("loader", LOADERS)
def test_yaml_depth_counts_levels_through_aliases(loader: type[Any] | None) -> None:
    assert docs("a: [[[1]]]", loader, max_depth=4) == [{"a": [[[1]]]}]
    loc, msg = refusal("a: [[[[1]]]]", loader, max_depth=4)
    assert loc == ["body", 0, "a", 0, 0, 0]
    assert msg == "nested more than 4 levels deep (EDGEFLEET_MAX_NESTING_DEPTH) at line 1, column 7"
    # Each alias alone is shallow enough; where it is used it is not.
    loc, msg = refusal("a: &a [[1]]\nb: [[*a]]", loader, max_depth=4)
    assert loc == ["body", 0, "b", 0, 0]
    assert "nested more than 4 levels deep" in msg


@pytest.mark.parametrize("loader", LOADERS)
def test_yaml_values_are_counted_with_aliases_expanded(loader: type[Any] | None) -> None:
    ten = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"  # the root, a, and its list of 9: 12 values
    assert docs(ten, loader, max_nodes=12)
    loc, msg = refusal(ten + "b: [*a, *a]\n", loader, max_nodes=30)
    assert loc == ["body", 0, "b", 1]
    assert msg.startswith("more than 30 values, aliases counted as the values they repeat")
    assert msg.endswith("(EDGEFLEET_MAX_INPUT_NODES) at line 2, column 9")


@pytest.mark.parametrize("loader", LOADERS)
def test_a_billion_laughs_is_refused_before_it_is_built(loader: type[Any] | None) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 30)]
    loc, msg = refusal("\n".join(lines), loader, max_nodes=1_000_000)
    # Refused at the first alias that takes the count over the bound (a6: 9**6 values
    # and more), 23 levels before the end: nothing past it was read, let alone built.
    assert loc == ["body", 0, "a6", 0]
    assert "more than 1000000 values" in msg
    assert "at line 7, column 10" in msg


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    ("text", "loc", "msg"),
    [
        ("a: 1\nb: 2\na: 3\n", ["body", 0, "a"], "repeated key 'a' (first at line 1) at line 3"),
        ("x: {1: a, 0x1: b}", ["body", 0, "x", "1"], "repeated key 1 (first at line 1)"),
        ("x: {yes: a, true: b}", ["body", 0, "x", "True"], "repeated key True"),
        ("- {k: 1}\n- {k: 1, k: 2}\n", ["body", 0, 1, "k"], "repeated key 'k'"),
    ],
)
def test_a_repeated_yaml_key_is_refused(
    loader: type[Any] | None, text: str, loc: list[Any], msg: str
) -> None:
    got_loc, got_msg = refusal(text, loader)
    assert got_loc == loc
    assert got_msg.startswith(msg)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_merge_key_may_be_overridden(loader: type[Any] | None) -> None:
    text = "b: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n"
    assert docs(text, loader) == [{"b": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}]


@pytest.mark.parametrize("loader", LOADERS)
def test_documents_are_counted_as_they_come(loader: type[Any] | None) -> None:
    assert len(docs("---\na: 1\n" * 3, loader, max_documents=3)) == 3
    loc, msg = refusal("---\na: 1\n" * 4 + "--- [unclosed\n", loader, max_documents=3)
    assert loc == ["body"]
    assert msg == "more than 3 YAML documents in one request (EDGEFLEET_MAX_MANIFEST_DOCUMENTS)"


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("&a [*a]", "alias *a refers to a node that contains it at line 1, column 5"),
        ("a: *nowhere", "not valid YAML at line 1, column 4: found undefined alias 'nowhere'"),
        ("a: 2024-02-30", "not valid YAML at line 1, column 4: day is out of range for month"),
        ("a: " + "1:" * 2200 + "1", "an integer longer than 4300 characters"),
        ("a: !!python/name:os.system x", "could not determine a constructor"),
    ],
)
def test_yaml_that_cannot_be_built_is_422(loader: type[Any] | None, text: str, msg: str) -> None:
    assert msg in refusal(text, loader)[1]


def test_yaml_at_the_largest_depth_setting_parses_in_a_worker_thread() -> None:
    """Settings allow a depth of 200; composing recurses per level."""
    got: list[Any] = []
    text = "a: " + "[" * 200 + "]" * 200

    def parse(loader: type[Any] | None) -> None:
        got.append(docs(text, loader, max_depth=201))

    for loader in (None, _PyLoader):
        thread = threading.Thread(target=parse, args=(loader,))
        thread.start()
        thread.join()
    assert len(got) == 2


# --- JSON ----------------------------------------------------------------------------


def json_refusal(text: str, *, max_depth: int = 64, max_nodes: int = 1000) -> tuple[list[Any], str]:
    with pytest.raises(InvalidInput) as info:
        load_json(
            text, what="params", loc=("body", "params"), max_depth=max_depth, max_nodes=max_nodes
        )
    return list(info.value.loc), info.value.message


@pytest.mark.parametrize(
    ("text", "loc", "msg"),
    [
        ("[" * 5 + "]" * 5, ["body", "params", 0, 0, 0, 0], "params is nested more than 4 levels"),
        ("[" * 100_000, ["body", "params"], "params is nested more than 4 levels deep"),
        (
            '{"a": [1, {"b": 1, "b": 2}]}',
            ["body", "params", "a", 1, "b"],
            "params repeats the key 'b'",
        ),
        ("[" + "1," * 20 + "1]", ["body", "params"], "params holds more than 20 values"),
        ('{"a": 1', ["body", "params"], "params is not valid JSON: Expecting ',' delimiter"),
        ("1" * 5000, ["body", "params"], "params is not valid JSON: Exceeds the limit (4300"),
        ('{"rtol": NaN}', ["body", "params"], "params is not valid JSON: NaN is not a JSON"),
    ],
)
def test_json_out_of_bounds(text: str, loc: list[Any], msg: str) -> None:
    got_loc, got_msg = json_refusal(text, max_depth=4, max_nodes=20)
    assert got_loc == loc
    assert got_msg.startswith(msg)


def test_json_within_the_bounds() -> None:
    value = {"a": [1, {"b": [None, True]}], "c": "d"}
    text = '{"a": [1, {"b": [null, true]}], "c": "d"}'
    assert load_json(text, what="x", max_depth=4, max_nodes=8) == value
    assert json_refusal(text, max_depth=3)[1].startswith("params is nested more than 3")
    assert json_refusal(text, max_nodes=7)[1].startswith("params holds more than 7 values")
