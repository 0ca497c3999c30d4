"""yaml.safe_load, stricter: duplicate keys are errors, and aliases cannot blow a recipe up.

PyYAML keeps the last of two equal keys silently (`learning_rate` twice: the first is ignored),
and expands aliases without limit (a few lines of nested anchors become megabytes). A recipe is
a small tree of plain values, so both are refused with the line(s) to fix.
"""

from __future__ import annotations

import yaml

from rrhf_lite.errors import UserInputError

MAX_NODES = 100_000  # values in the expanded recipe; real recipes hold a few hundred


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first_line: int, second_line: int):
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(f"duplicate key {key!r} (lines {first_line} and {second_line})")


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: let PyYAML report it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _count_nodes(value, limit: int) -> int:
    """Values in the tree as a dump would write it (shared subtrees counted each time)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_strict(text: str, where: str):
    """Parse recipe YAML; UserInputError naming `where` and the line(s) for what we refuse.
    Other YAML syntax errors propagate as yaml.YAMLError (the caller names their line)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise UserInputError(
            f"key {err.key!r} appears twice in one mapping (lines {err.first_line} and "
            f"{err.second_line})", where=f"{where} line {err.second_line}",
            hint="keep one of them; YAML would silently use the last") from None
    if _count_nodes(data, MAX_NODES) > MAX_NODES:
        raise UserInputError(
            f"the recipe expands to more than {MAX_NODES} values (aliases repeating aliases?)",
            where=where, hint="write the values out; recipes need no deeply nested aliases")
    return data
