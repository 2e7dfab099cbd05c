"""YAML for configs: safe tags only, a key given twice in one mapping refused with both lines."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: plain PyYAML keeps the last, so a second
    `train:` block silently replaced the first. Keys brought in by a `<<:` merge may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
                        raise DuplicateKey(
                            None, None, f"duplicate key {shown} (first at line {first[key] + 1})", key_node.start_mark
                        )
                    first[key] = key_node.start_mark.line
                except TypeError:
                    continue  # an unhashable key: SafeLoader refuses it with its own message
        return super().construct_mapping(node, deep=deep)


# PyYAML's constructors raise plain ValueError and friends for some scalars (`!!float A`, a 5000-digit int)
# and RecursionError for deep nesting: for a config these are bad YAML like any other.
YAML_ERRORS = (yaml.YAMLError, ValueError, LookupError, AttributeError, RecursionError)


def load_yaml(text: str) -> Any:
    """Parse config YAML: safe tags only, duplicate keys refused. Raises one of YAML_ERRORS."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
