"""JSON and YAML from requests, parsed within bounds.

``json.loads`` and PyYAML have none. A value nested a few thousand levels deep raises
RecursionError (a 500); a YAML alias stands for a whole subtree, so a "billion laughs"
document of a few hundred bytes means 10^9 values to whatever walks it next (pydantic,
the JSON encoder of a JSONB column); a repeated mapping key silently keeps its last
value. Here each is refused as InvalidInput (422) with its field path: nesting deeper
than ``max_depth``, more than ``max_nodes`` values (an alias counted as the values it
repeats, before anything is expanded) and any repeated key.

The limits are settings (a caller passes their values); messages name them, so whoever
hits one knows which knob it is. Services call this module, so it depends on nothing
of the HTTP layer."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, MappingStartEvent, NodeEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.resolver import Resolver

from controller.errors import InvalidInput

Loc = tuple[str | int, ...]

DEPTH_SETTING = "EDGEFLEET_MAX_NESTING_DEPTH"
NODES_SETTING = "EDGEFLEET_MAX_INPUT_NODES"
DOCUMENTS_SETTING = "EDGEFLEET_MAX_MANIFEST_DOCUMENTS"
# Python refuses decimal integers longer than this (sys.int_info.default_max_str_digits);
# YAML's other integer forms are held to it too. A sexagesimal one (1:2:3, YAML 1.1) is
# built by repeated multiplication, quadratic in its length without a bound.
MAX_INT_CHARS = 4300
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"


# --- JSON ---------------------------------------------------------------------------


class _RepeatedKey(dict[str, Any]):
    """An object with a repeated key. The hook that builds objects cannot know where
    they are; the walk after parsing reports it with its path."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                return _RepeatedKey(pairs, key)
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    # json.loads takes NaN and Infinity, which are not JSON: a JSONB column refuses them.
    raise ValueError(f"{name} is not a JSON number")


def load_json(
    text: str | bytes, *, what: str, max_depth: int, max_nodes: int, loc: Loc = ("body",)
) -> Any:
    """The value of JSON ``text``; ``what`` names it in messages ("metadata")."""
    try:
        value = json.loads(text, object_pairs_hook=_json_object, parse_constant=_no_constant)
    except RecursionError:
        # Deeper than the parser's C stack allows: far beyond any sensible max_depth.
        raise InvalidInput(
            f"{what} is nested more than {max_depth} levels deep ({DEPTH_SETTING})", loc=loc
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            loc=loc,
        ) from None
    except ValueError as exc:  # NaN, or an integer longer than Python converts (4300 digits)
        raise InvalidInput(f"{what} is not valid JSON: {exc}", loc=loc) from None
    _check_json(value, what=what, max_depth=max_depth, max_nodes=max_nodes, loc=loc)
    return value


# A path as a chain (parent chain, key): O(1) per value, spelled out only for an error.
_Link = tuple["_Link", str | int] | None


def _path(link: _Link) -> list[str | int]:
    out: list[str | int] = []
    while link is not None:
        link, key = link
        out.append(key)
    out.reverse()
    return out


def _check_json(value: Any, *, what: str, max_depth: int, max_nodes: int, loc: Loc) -> None:
    """Depth, size and repeated keys of a parsed value, without recursion."""
    nodes = 0
    stack: list[tuple[Any, int, _Link]] = [(value, 1, None)]
    while stack:
        value, depth, link = stack.pop()
        nodes += 1
        if isinstance(value, dict):
            if isinstance(value, _RepeatedKey):
                raise InvalidInput(
                    f"{what} repeats the key {value.key!r} in one object",
                    loc=(*loc, *_path(link), value.key),
                )
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth > max_depth:
            raise InvalidInput(
                f"{what} is nested more than {max_depth} levels deep ({DEPTH_SETTING})",
                loc=(*loc, *_path(link)),
            )
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, (link, key)))
            else:
                nodes += 1
        if nodes > max_nodes:
            raise InvalidInput(
                f"{what} holds more than {max_nodes} values ({NODES_SETTING})",
                loc=(*loc, *_path(link)),
            )


# --- YAML ---------------------------------------------------------------------------


class _BoundedComposer(Composer):
    """PyYAML's composer, counting as it goes: the nesting depth, the values (an alias
    as the values of the subtree it repeats) and the documents; and refusing a repeated
    key. Each bound is checked before the node that would pass it is composed."""

    if TYPE_CHECKING:  # the parser's and the constructor's, in the loaders below
        # While a node is composed, the next event is always a node's.
        def peek_event(self) -> NodeEvent: ...
        def construct_object(self, node: Node, deep: bool = False) -> Any: ...

    def bound(self, *, max_depth: int, max_nodes: int, max_documents: int, loc: Loc) -> None:
        self.max_depth, self.max_nodes, self.max_documents = max_depth, max_nodes, max_documents
        self.loc = loc
        self.documents = 0  # documents begun
        self.kept = 0  # non-empty documents composed: the index of the current one
        self.nodes = 0
        self.depth = 0  # collections around the node being composed
        self.deepest = 0  # the deepest level reached in the current subtree
        self.path: list[Any] = []  # each open node's index in its parent (see refuse)
        # anchor -> (values, levels) of its subtree, once composed. An anchor in
        # self.anchors but not here is still open: an alias to it is a cycle.
        self.expansions: dict[str, tuple[int, int]] = {}

    def refuse(self, message: str, node_or_event: Any, *key: str | int) -> InvalidInput:
        mark = node_or_event.start_mark
        # An index is an int in a sequence, the key's node in a mapping, None for the
        # root and for a key being composed.
        path = [
            i if isinstance(i, int) else i.value if isinstance(i, ScalarNode) else "?"
            for i in self.path
            if i is not None
        ]
        return InvalidInput(
            f"{message} at line {mark.line + 1}, column {mark.column + 1}",
            loc=(*self.loc, self.kept, *path, *key),
        )

    def compose_document(self) -> Node | None:
        if self.documents >= self.max_documents:
            raise InvalidInput(
                f"more than {self.max_documents} YAML documents in one request "
                f"({DOCUMENTS_SETTING})",
                loc=self.loc,
            )
        self.documents += 1
        self.expansions = {}
        node = super().compose_document()
        if not (isinstance(node, ScalarNode) and node.tag == _NULL_TAG):
            self.kept += 1
        return node

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # The hot loop: no try/finally for the path, a refusal ends the parse anyway.
        self.path.append(index)
        event = self.peek_event()
        anchor = event.anchor
        if isinstance(event, AliasEvent):
            if anchor in self.expansions:
                nodes, levels = self.expansions[anchor]
                self._count(nodes, event)
                self._reach(self.depth + levels, event)
            elif anchor in self.anchors:
                raise self.refuse(f"alias *{anchor} refers to a node that contains it", event)
            node = super().compose_node(parent, index)  # an unknown alias: PyYAML's error
            self.path.pop()
            return node
        base, before = self.depth, self.nodes
        self._count(1, event)
        outer_deepest, self.deepest = self.deepest, base
        if isinstance(event, SequenceStartEvent | MappingStartEvent):
            self.depth = base + 1
            self._reach(self.depth, event)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self.expansions[anchor] = (self.nodes - before, self.deepest - base)
        self.depth, self.deepest = base, max(outer_deepest, self.deepest)
        self.path.pop()
        return node

    def _count(self, nodes: int, event: Any) -> None:
        self.nodes += nodes
        if self.nodes > self.max_nodes:
            raise self.refuse(
                f"more than {self.max_nodes} values, aliases counted as the values they "
                f"repeat ({NODES_SETTING})",
                event,
            )

    def _reach(self, level: int, event: Any) -> None:
        if level > self.max_depth:
            raise self.refuse(
                f"nested more than {self.max_depth} levels deep ({DEPTH_SETTING})", event
            )
        self.deepest = max(self.deepest, level)

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, ScalarNode] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a merge (<<) may be overridden; a complex key is rare
            # Compared as constructed: 1 and 0x1, true and yes are one key.
            key = (
                key_node.value
                if key_node.tag == _STR_TAG
                else self.construct_object(key_node, deep=True)
            )
            first = seen.get(key)
            if first is not None:
                raise self.refuse(
                    f"repeated key {key!r} (first at line {first.start_mark.line + 1})",
                    key_node,
                    key if isinstance(key, str) else str(key),
                )
            seen[key] = key_node
        return node


class _Constructor(SafeConstructor):
    """SafeConstructor whose value errors (a date like 2024-13-45) are YAML errors with
    a line, not 500s."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise ConstructorError(None, None, str(exc), node.start_mark) from exc

    def construct_yaml_int(self, node: ScalarNode) -> int:
        if len(node.value) > MAX_INT_CHARS:
            raise ConstructorError(
                None, None, f"an integer longer than {MAX_INT_CHARS} characters", node.start_mark
            )
        value: int = super().construct_yaml_int(node)
        return value

    yaml_constructors = {
        **SafeConstructor.yaml_constructors,
        "tag:yaml.org,2002:int": construct_yaml_int,
    }


class _PyLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    _BoundedComposer,
    _Constructor,
    Resolver,
):
    def __init__(self, text: str | bytes) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _Constructor.__init__(self)
        Resolver.__init__(self)


_Loader: type[Any] = _PyLoader
if yaml.__with_libyaml__:  # else PyYAML was built without libyaml: the loader above
    from yaml._yaml import CParser

    # libyaml scans and parses (fast, and without recursion); the composer above, in
    # Python, builds the nodes from its events, ahead of CParser's own in the MRO.
    class _CLoader(_BoundedComposer, CParser, _Constructor, Resolver):
        def __init__(self, text: str | bytes) -> None:
            CParser.__init__(self, text)
            _BoundedComposer.__init__(self)
            _Constructor.__init__(self)
            Resolver.__init__(self)

    _Loader = _CLoader


def load_yaml_documents(
    text: str | bytes,
    *,
    max_depth: int,
    max_nodes: int,
    max_documents: int,
    loc: Loc = ("body",),
    loader: type[Any] | None = None,
) -> list[Any]:
    """The documents of a YAML stream, empty ones left out. ``loader`` is for tests
    (the pure-Python one where libyaml is there)."""
    parser = (loader or _Loader)(text)
    parser.bound(max_depth=max_depth, max_nodes=max_nodes, max_documents=max_documents, loc=loc)
    try:
        documents = []
        while parser.check_data():
            document = parser.get_data()
            if document is not None:
                documents.append(document)
        return documents
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidInput(
            f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}",
            loc=loc,
        ) from None
    finally:
        parser.dispose()
