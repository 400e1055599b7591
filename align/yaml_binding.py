"""Typed dataclasses from YAML, with every mistake located by file, line and dotted key.

The YAML is read as a node tree (`compose`), not as plain dicts, because only nodes keep the line each
value came from. `build` walks that tree along the dataclasses' type hints; a dataclass's `__post_init__`
may raise `ConfigError(key=<field>)` without a location, and `build` points it at that field's node.

An override (`stages.dpo.loss.beta=0.05`) becomes nodes too: `apply_override` composes its value as a
YAML document of its own, marks those nodes as coming from the command line and splices them into the
tree before anything is built, so a bad override fails like a bad line, naming the override instead.
Keys are dotted; a list item is named by its index or its `name`. Beyond type hints the binder knows no
schema; `Variants` tells it which subclass a field typed as a base dataclass holds, picked by a key's
value (`kind: dpo`) or by which key is there (`rule: ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Literal, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from align.errors import ConfigError

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a list item whose `name` looks like this is keyed by it
_NULL, _MAP = "tag:yaml.org,2002:null", "tag:yaml.org,2002:map"
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # PyYAML reads `2e-4` as a string


class Variants(typing.NamedTuple):
    """The subclasses that a field typed as a base dataclass may hold, picked by one key's value
    (`kind: dpo`), or, with `field` None, by which of the registry's keys the mapping has (`rule: x`)."""

    field: str | None  # the key that picks, such as "kind"; None: the registry's keys pick by being there
    registry: dict[str, type]  # each value of that key (or each key) and the subclass it picks
    label: str  # what errors call it: "unknown <label> 'x'"


def compose(text: str, source: str) -> Node | None:
    """The node tree of YAML `text`, None if it holds no document; `source` names it in errors."""
    try:
        loader = yaml.SafeLoader(text)
        loader.name = source  # marks carry this name, so errors name the file
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"YAML syntax: {e.problem or e.context}", file=source,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise ConfigError(str(e), file=source) from None


class _CommandLine(yaml.Mark):
    """Stands in for a file position on nodes that a command-line override put into the tree."""

    def __init__(self, override: str):
        super().__init__("command line", 0, 0, 0, None, None)
        self.override = override


def _error(node: Node, key: str, message: str) -> ConfigError:
    mark = node.start_mark
    if isinstance(mark, _CommandLine):
        return ConfigError(f"{message} (override '{mark.override}')", file=mark.name, key=key)
    return ConfigError(message, file=mark.name, line=mark.line + 1, key=key)


def _split_key(key: str) -> list[str]:
    return re.findall(r"[^.\[\]]+", key)  # stages[1].loss.beta and stages.1.loss.beta alike


def _child(node: Node, part: str) -> Node | None:
    """The value under `part`: a mapping's key, or a list item by index or by its `name`."""
    if isinstance(node, MappingNode):
        return next((v for k, v in node.value if k.value == part), None)
    if isinstance(node, SequenceNode):
        for item in node.value:
            if isinstance(item, MappingNode) and any(
                    k.value == "name" and getattr(v, "value", None) == part for k, v in item.value):
                return item
        if part.isdigit() and int(part) < len(node.value):
            return node.value[int(part)]
    return None


def _locate(node: Node, key: str) -> Node:
    """The node at relative `key`, or the deepest one on the way (a field left at its default has none)."""
    for part in _split_key(key):
        child = _child(node, part)
        if child is None:
            break
        node = child
    return node


def apply_override(root: MappingNode, override: str) -> None:
    """Splice `dotted.key=value` into `root`, adding the keys and sections it names that are missing."""
    mark = _CommandLine(override)
    key, eq, text = override.partition("=")
    parts = _split_key(key)
    if not eq or not parts:
        raise ConfigError(f"expected key=value, got '{override}'", file=mark.name)
    try:
        value = yaml.compose(text, Loader=yaml.SafeLoader) or _null(mark)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"cannot parse the value of '{override}': {problem}", file=mark.name, key=key) from None
    for n in _walk(value):
        n.start_mark = n.end_mark = mark
    node = root
    for i, part in enumerate(parts):
        last, here = i == len(parts) - 1, ".".join(parts[:i])  # only reported below the root (a mapping)
        if isinstance(node, SequenceNode):
            child = _child(node, part)
            if child is None:
                raise _error(value, key, f"{here} has no item named or numbered '{part}'")
            if last:
                node.value[node.value.index(child)] = value
            node = child
        elif isinstance(node, MappingNode):
            pairs = node.value
            index = next((j for j, (k, _) in enumerate(pairs) if k.value == part), None)
            if index is None:
                pairs.append((ScalarNode("tag:yaml.org,2002:str", part, mark, mark), _null(mark)))
                index = len(pairs) - 1
            if last or _is_null(pairs[index][1]):  # a null or new section (eval_data: null) gets keys
                pairs[index] = (pairs[index][0], value if last else MappingNode(_MAP, [], mark, mark))
            node = pairs[index][1]
        else:
            raise _error(value, key, f"cannot set '{part}': {here} is not a mapping")


def _walk(node: Node):
    yield node
    children = node.value if isinstance(node, SequenceNode) else [] if isinstance(node, ScalarNode) else [
        n for pair in node.value for n in pair]
    for child in children:
        yield from _walk(child)


def _null(mark: yaml.Mark) -> ScalarNode:
    return ScalarNode(_NULL, "", mark, mark)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _describe(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return f"'{node.value}'" if node.value else "nothing"
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


def build(cls: type, node: Node, variants: dict[type, Variants], key: str = ""):
    """An instance of dataclass `cls` from mapping `node` found at dotted `key`."""
    if not isinstance(node, MappingNode):
        raise _error(node, key, f"expected a mapping of keys, got {_describe(node)}")
    prefix, variant, picked = f"{key}." if key else "", variants.get(cls), None
    if variant:  # the picked subclass decides which keys are valid, so its key is read first
        picked = _pick(node, variant, prefix)
        cls = variant.registry[picked]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {}
    for key_node, value_node in node.value:
        name = key_node.value
        if variant and variant.field is None and name in variant.registry and name != picked:
            continue  # null, else `_pick` had refused it: older saved recipes have `rule: null` beside `model: x`
        if name in values:
            raise _error(key_node, prefix + name, f"duplicate key '{name}'")
        if name not in fields:
            raise _error(key_node, prefix + name, _unknown_key(name, list(fields), variant, picked))
        values[name] = _convert(hints[name], value_node, prefix + name, variants)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _error(node, prefix + name, f"missing required key '{name}'")
    try:
        return cls(**values)
    except ConfigError as e:
        if e.file is not None:
            raise
        raise _error(_locate(node, e.key), prefix + e.key, e.message) from None


def _pick(node: MappingNode, variant: Variants, prefix: str) -> str:
    """The registry entry that mapping `node` picks: by its `variant.field`'s value, or by the one registry key
    it has (a null value does not count)."""
    choices = ", ".join(variant.registry)
    if variant.field is None:
        present = [k for k, v in node.value if k.value in variant.registry and not _is_null(v)]
        if len(present) == 1:
            return present[0].value
        needs = f"a {variant.label} needs exactly one of the keys {choices}"
        if present:
            raise _error(present[1], prefix + present[1].value,
                         f"{needs}, not both '{present[0].value}' and '{present[1].value}'")
        # named by its first choice, as a mapping without `kind` is named by `kind`
        raise _error(node, prefix + next(iter(variant.registry)), f"{needs}; this one has none")
    tag = _child(node, variant.field)
    if not isinstance(tag, ScalarNode) or tag.value not in variant.registry:
        problem = f"unknown {variant.label} {_describe(tag)}" if tag else f"missing required key '{variant.field}'"
        raise _error(tag or node, prefix + variant.field, f"{problem}; choose from: {choices}")
    return tag.value


def _unknown_key(name: str, valid: list[str], variant: Variants | None, picked: str | None) -> str:
    if variant:  # a key of a sibling subclass is a wrong variant, not a typo
        others = [v for v, c in variant.registry.items() if name in {f.name for f in dataclasses.fields(c)}]
        if others:
            which = variant.field or variant.label
            return f"'{name}' is not valid for {which} {picked}, only for {which} {', '.join(others)}"
    close = difflib.get_close_matches(name, valid, n=1)
    return f"unknown key '{name}'; " + (f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}")


def _convert(tp, node: Node, key: str, variants: dict[type, Variants]):
    """The value of type `tp` held by `node`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if _is_null(node) and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], node, key, variants)
        # str | list[str], DataConfig | list[DataConfig]: the node's shape picks the type
        shape = {ScalarNode: str, SequenceNode: list, MappingNode: dict}[type(node)]
        for option in options:
            if (typing.get_origin(option) or option) is shape or (shape is dict and dataclasses.is_dataclass(option)):
                return _convert(option, node, key, variants)
        expected = " or ".join("a mapping" if dataclasses.is_dataclass(o) else _expected(o) if o in (str, int, float,
                               bool) else "a list" for o in options)
        raise _error(node, key, f"expected {expected}, got {_describe(node)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, node, variants, key)
    if origin is list:
        if not isinstance(node, SequenceNode):
            raise _error(node, key, f"expected a list, got {_describe(node)}")
        return [_convert(args[0], item, _item_key(key, i, item), variants) for i, item in enumerate(node.value)]
    if isinstance(node, ScalarNode):
        try:
            value = yaml.constructor.SafeConstructor().construct_document(node)
        except (yaml.YAMLError, ValueError):  # an unknown !tag, or a date like 2024-13-45
            value = node.value
        if origin is Literal and value in args:
            return value
        if tp is str and value is not None and not isinstance(value, bool):
            return node.value  # `name: 2024` is a name, not a number
        if tp is float and isinstance(value, str) and NUMBER.fullmatch(value):
            value = float(value)
        if tp is float and type(value) in (int, float) and math.isfinite(value):  # a bool is no number
            return float(value)
        if tp in (int, bool) and type(value) is tp:
            return value
    raise _error(node, key, f"expected {_expected(tp)}, got {_describe(node)}")


def _item_key(key: str, i: int, item: Node) -> str:
    # stages.dpo.loss.beta reads better than stages[1].loss.beta, and is how overrides spell it
    name = _child(item, "name") if isinstance(item, MappingNode) else None
    if isinstance(name, ScalarNode) and IDENTIFIER.fullmatch(name.value):
        return f"{key}.{name.value}"
    return f"{key}[{i}]"


def _expected(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]
