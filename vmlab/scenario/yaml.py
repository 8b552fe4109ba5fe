"""Safe YAML loading that remembers where every mapping, key and value came from.

`yaml.safe_load` throws positions away; scenario errors must say FILE:LINE:COL. So we compose the
document with `yaml.SafeLoader` (never the full loader), construct only scalars with the safe
constructor, and keep a 1-based (line, column) on every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

MAP = "map"
SEQ = "seq"
SCALAR = "scalar"

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


@dataclass
class Node:
    """One YAML node: a mapping (value: dict[str, Node]), a sequence (list[Node]) or a scalar."""

    kind: str
    value: Any
    line: int
    column: int
    keys: dict[str, "Node"] = field(default_factory=dict)  # mappings only: the key nodes

    def plain(self) -> Any:
        """The node as ordinary Python data (dicts, lists, scalars), positions dropped."""
        if self.kind == MAP:
            return {k: v.plain() for k, v in self.value.items()}
        if self.kind == SEQ:
            return [v.plain() for v in self.value]
        return self.value

    def kind_name(self) -> str:
        return {MAP: "a mapping", SEQ: "a list"}.get(self.kind, "a scalar")


@dataclass(frozen=True)
class YamlIssue:
    """A problem found while turning nodes into data; the document itself was still readable."""

    line: int
    column: int
    message: str


class YamlSyntaxError(Exception):
    """The text is not (a single document of) valid YAML; position as yaml reported it, 1-based."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(f"{line}:{column}: {message}")
        self.line = line
        self.column = column
        self.message = message


def _mark(m: Any) -> tuple[int, int]:
    return (m.line + 1, m.column + 1) if m is not None else (1, 1)


def _syntax_error(exc: yaml.YAMLError, text: str) -> YamlSyntaxError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, col = _mark(mark)
        parts = [p for p in (exc.context, exc.problem) if p]
        return YamlSyntaxError(line, col, "YAML syntax error: " + ", ".join(parts))
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = before.count("\n") + 1
        col = exc.position - (before.rfind("\n") + 1) + 1
        return YamlSyntaxError(line, col, f"YAML syntax error: {exc.reason}")
    return YamlSyntaxError(1, 1, f"YAML syntax error: {exc}")


class _Builder:
    """Walks composed yaml nodes into `Node`s; shares converted aliases and refuses recursion."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.issues: list[YamlIssue] = []
        self.done: dict[int, Node] = {}
        self.active: set[int] = set()

    def issue(self, ynode: yaml.Node, message: str) -> None:
        line, col = _mark(ynode.start_mark)
        self.issues.append(YamlIssue(line, col, message))

    def build(self, ynode: yaml.Node) -> Node:
        key = id(ynode)
        if key in self.done:
            return self.done[key]
        line, col = _mark(ynode.start_mark)
        if key in self.active:
            self.issue(ynode, "recursive YAML alias is not allowed")
            return Node(SCALAR, None, line, col)
        self.active.add(key)
        try:
            if isinstance(ynode, yaml.MappingNode):
                node = self._mapping(ynode, line, col)
            elif isinstance(ynode, yaml.SequenceNode):
                if ynode.tag != _SEQ_TAG:
                    self.issue(ynode, f"unsupported YAML tag {ynode.tag!r} on a list")
                node = Node(SEQ, [self.build(item) for item in ynode.value], line, col)
            else:
                node = Node(SCALAR, self._scalar(ynode), line, col)
        finally:
            self.active.discard(key)
        self.done[key] = node
        return node

    def _scalar(self, ynode: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(ynode, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.issue(ynode, f"cannot read value: {problem}")
            return None

    def _mapping(self, ynode: yaml.MappingNode, line: int, col: int) -> Node:
        if ynode.tag != _MAP_TAG:
            self.issue(ynode, f"unsupported YAML tag {ynode.tag!r} on a mapping")
        own = {id(k) for k, _ in ynode.value}
        try:
            self.loader.flatten_mapping(ynode)  # resolves `<<: *anchor` merge keys
        except yaml.YAMLError as exc:
            self.issue(ynode, f"bad merge key: {getattr(exc, 'problem', exc)}")
        node = Node(MAP, {}, line, col)
        merged: set[str] = set()  # keys that came from `<<:`; the mapping's own keys override them
        for knode, vnode in ynode.value:
            if not isinstance(knode, yaml.ScalarNode):
                got = "a mapping" if isinstance(knode, yaml.MappingNode) else "a list"
                self.issue(knode, f"mapping keys must be strings, got {got}")
                continue
            key = self._scalar(knode)
            if not isinstance(key, str):
                self.issue(knode, f"mapping keys must be strings, got {key!r}")
                continue
            kline, kcol = _mark(knode.start_mark)
            is_own = id(knode) in own
            if key in node.value and key not in merged:
                if is_own:
                    first = node.keys[key]
                    self.issue(knode, f"duplicate key '{key}' (first defined at line {first.line})")
                continue  # a merged key never overrides the mapping's own key
            if is_own:
                merged.discard(key)
            else:
                merged.add(key)
            node.keys[key] = Node(SCALAR, key, kline, kcol)
            node.value[key] = self.build(vnode)
        return node


def compose(text: str) -> tuple[Node | None, list[YamlIssue]]:
    """Parse one YAML document. Returns (root or None if empty, non-fatal issues).

    Raises YamlSyntaxError when the text is not a single valid YAML document.
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters up front
        raise _syntax_error(exc, text) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, text) from None
        if root is None:
            return None, []
        builder = _Builder(loader)
        node = builder.build(root)
        return node, builder.issues
    finally:
        loader.dispose()
