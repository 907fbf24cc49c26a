"""YAML for configs, strictly: what a typo or a hostile file would otherwise let through.

- a duplicate key in one mapping is a :class:`ConfigError` naming the key and its line (PyYAML
  keeps the last one silently);
- a document over :data:`MAX_BYTES`, or one whose aliases expand to more than
  :data:`MAX_VALUES` values (a "billion laughs" file of a few lines), is refused at once, before
  anything walks the expanded tree (the expansion is counted on the shared graph, in linear time);
- an empty document is refused by :func:`pipelines.config.load_config` (an empty file would
  otherwise run the full default job).
"""

from __future__ import annotations

from typing import Any

import yaml

from tda.errors import ConfigError

MAX_BYTES = 1 << 20  # 1 MiB of YAML: far beyond any config
MAX_VALUES = 100_000  # values after alias expansion


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(value: Any, limit: int = MAX_VALUES) -> int:
    """How many values ``value`` holds with every shared (aliased) part counted each time it is
    used; memoised per object, so a small graph of huge expansion is measured in linear time."""
    memo: dict[int, int] = {}

    def size(obj: Any) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        if id(obj) in memo:
            return memo[id(obj)]
        memo[id(obj)] = limit + 1  # a cycle (a recursive alias) counts as too big
        children = list(obj.items()) if isinstance(obj, dict) else obj
        total = 1
        for child in children:
            total += sum(size(c) for c in child) if isinstance(obj, dict) else size(child)
            if total > limit:
                break
        memo[id(obj)] = total
        return total

    return size(value)


def load_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text`` (``where`` names it in errors), checked as the module says."""
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise ConfigError(f"{where} is {len(text.encode('utf-8')):,} bytes; a config is at most {MAX_BYTES:,}: is it "
                          "the right file?")
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where} nests too deeply to be a config") from exc
    if expanded_size(value) > MAX_VALUES:
        raise ConfigError(f"{where} expands to more than {MAX_VALUES:,} values through YAML aliases (&/*); write the "
                          "values out, or use fewer aliases")
    return value


__all__ = ["MAX_BYTES", "MAX_VALUES", "expanded_size", "load_yaml"]
