"""YAML as hvae reads a config (a file or a ``--set`` value): bounded and unambiguous.

Plain ``yaml.safe_load`` lets a few hostile or mistaken inputs through: aliases nested a few
levels deep that expand to billions of values (the "billion laughs"), nesting deep enough to
overflow Python's stack, an alias to its own anchor (a cyclic value) and a key given twice
(the last one silently wins). Each of those is refused here as one :class:`ConfigError`.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hvae_core.errors import ConfigError

# A real config holds a few hundred values and nests five levels (tracker.NAME.key: [list]);
# these bounds leave plenty of room and still stop an alias bomb after a few thousand steps.
MAX_VALUES = 10_000
MAX_DEPTH = 32
MERGE_TAG = "tag:yaml.org,2002:merge"


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _Loader(yaml.SafeLoader):
    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # The composer recurses once per level: stop before Python's stack does.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _too_deep(self.where, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _too_deep(where: str, mark: Any = None) -> ConfigError:
    return ConfigError(
        f"{where}: values nested more than {MAX_DEPTH} levels deep{_at(mark)}",
        hint="a config is sections of options whose values are numbers, strings or lists",
    )


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Checker:
    """Walks the composed node graph once (aliases share nodes), counting every value as often
    as it would be expanded; refuses cycles, duplicate keys and too many or too deep values."""

    def __init__(self, loader: _Loader, where: str) -> None:
        self.loader = loader
        self.where = where
        self.memo: dict[int, tuple[int, int]] = {}  # node id -> (expanded values, height)
        self.active: set[int] = set()

    def measure(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise _too_deep(self.where, node.start_mark)
        key = id(node)
        if key in self.active:
            raise ConfigError(
                f"{self.where}: {path or 'the document'} refers to itself through an alias"
                f"{_at(node.start_mark)}",
                hint="an alias (*name) must point to a value defined before it, outside itself",
            )
        if key not in self.memo:
            self.active.add(key)
            self.memo[key] = self._walk(node, path, depth)
            self.active.discard(key)
        count, height = self.memo[key]
        if depth + height > MAX_DEPTH:
            raise _too_deep(self.where, node.start_mark)
        return count, height

    def _walk(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        children: list[tuple[Node, str]] = []
        if isinstance(node, SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}  # key -> where it was first given
            for key_node, value_node in node.value:
                name = self._key_name(key_node, path, seen)
                children += [(key_node, path), (value_node, _child(path, name))]
        count, height = 1, 0
        for child, child_path in children:
            child_count, child_height = self.measure(child, child_path, depth + 1)
            count += child_count
            height = max(height, child_height + 1)
            if count > MAX_VALUES:
                raise ConfigError(
                    f"{self.where}: more than {MAX_VALUES:,} values once its aliases are expanded",
                    hint="a config holds a few hundred values; write repeated values out, or "
                    "use aliases (*name) without nesting them",
                )
        return count, height

    def _key_name(self, key_node: Node, path: str, seen: dict[Any, Any]) -> str:
        if not isinstance(key_node, ScalarNode) or key_node.tag == MERGE_TAG:
            return "<key>" if not isinstance(key_node, ScalarNode) else "<<"
        # Constructed, so that keys YAML reads as equal (1 and 0x1) count as the same key.
        value = self.loader.construct_object(key_node)
        mark = key_node.start_mark
        if value in seen:
            first = seen[value]
            at = (
                f"line {mark.line + 1}, columns {first.column + 1} and {mark.column + 1}"
                if first.line == mark.line
                else f"lines {first.line + 1} and {mark.line + 1}"
            )
            what = f"section '{value}'" if not path else f"key {_child(path, str(value))}"
            raise ConfigError(
                f"{self.where}: {what} is given twice ({at})",
                hint="keep one of them (YAML would silently use the last)",
            )
        seen[value] = mark
        return str(value)


def load_yaml(text: str, where: str, path: str = "") -> Any:
    """The value of the YAML document ``text``; ``where`` names it in errors (``config file
    x.yaml``), ``path`` is the dotted key it is the value of (``--set model.z_width=...``)."""
    loader = None
    try:
        loader = _Loader(text, where)  # reads the text: refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _Checker(loader, where).measure(node, path, 1)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
        hint = "fix the YAML there (quote a value holding ':', '#', '[' or '{')"
        if isinstance(exc, yaml.reader.ReaderError):
            problem = f"{exc.reason} (character #x{exc.character:04x})"
            at = f" at character {exc.position + 1}"
            hint = "remove the control character: a config is plain text"
        else:
            at = _at(mark)
        problem = problem or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}", hint=hint) from None
    except RecursionError:
        raise _too_deep(where) from None
    finally:
        if loader is not None:
            loader.dispose()
