"""Shipped specs read the same with any YAML parser (issue 9, part 4).

batchlab's spec reader fixes one YAML 1.1 quirk (``1e-4`` is a float, not a string), but a
client that loads a spec with plain PyYAML, or with a YAML 1.2 parser, must get the same
values. So every file under experiments/ is checked two ways: plain ``yaml.safe_load`` gives
exactly what ``batchlab.search.read_yaml`` gives, and no plain scalar means something else
under the YAML 1.2 core schema (``yes``, ``010``, ``1_000``, ``1:30`` differ between 1.1 and
1.2)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from batchlab.search.spec import read_yaml

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "experiments").rglob("*.yaml")) + sorted(
    (ROOT / "experiments").rglob("*.yml"))

# The YAML 1.2 core schema's resolution of plain scalars (YAML 1.2.2, section 10.3.2).
_CORE = [
    ("null", re.compile(r"null|Null|NULL|~|")),
    ("bool", re.compile(r"true|True|TRUE|false|False|FALSE")),
    ("int", re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")),
    ("float", re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")),
]


def _core_value(text: str):
    """What a YAML 1.2 core-schema parser makes of a plain scalar."""
    for kind, pattern in _CORE:
        if pattern.fullmatch(text):
            if kind == "null":
                return None
            if kind == "bool":
                return text.lower() == "true"
            if kind == "int":
                if text.startswith(("0o", "0x")):
                    return int(text[2:], 8 if text[1] == "o" else 16)
                return int(text)
            lowered = text.lower()
            if lowered.endswith(".inf"):
                return -math.inf if lowered.startswith("-") else math.inf
            return math.nan if lowered == ".nan" else float(text)
    return text


def _plain_scalars(node):
    if isinstance(node, yaml.ScalarNode):
        if node.style is None:  # plain: quoted and block scalars are strings everywhere
            yield node
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _plain_scalars(item)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _plain_scalars(key)
            yield from _plain_scalars(value)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def test_there_are_specs_to_check():
    assert len(SPECS) >= 5


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_plain_pyyaml_reads_what_batchlab_reads(path):
    text = path.read_text()
    assert yaml.safe_load(text) == read_yaml(path)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_plain_scalar_means_the_same_in_yaml_1_2(path):
    loader = yaml.SafeLoader(path.read_text())
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    differing = []
    for node in _plain_scalars(root):
        as_11 = yaml.SafeLoader("").construct_object(node, deep=True)
        as_12 = _core_value(node.value)
        if not _same(as_11, as_12):
            differing.append(f"line {node.start_mark.line + 1}: {node.value!r} is {as_11!r} "
                             f"in YAML 1.1 but {as_12!r} in YAML 1.2")
    assert not differing, "\n".join(differing)


def test_the_checks_catch_what_they_are_for():
    """The two checks above fail on the spellings they guard against."""
    assert yaml.safe_load("lr: 1e-4") != read_yaml("lr: 1e-4\n")
    for text, as_12 in [("yes", "yes"), ("010", 10), ("1_000", "1_000"), ("1:30", "1:30")]:
        node = yaml.compose(f"v: {text}").value[0][1]
        assert not _same(yaml.SafeLoader("").construct_object(node), as_12)
        assert _same(_core_value(text), as_12)
