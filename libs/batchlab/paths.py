"""Dotted paths into nested mappings: "optimizer.weights.learning_rate.peak_value".

Search spaces write trial values at such paths into a spec's configs
(batchlab.search.space), optimizer configs turn their numbers into arguments by path
(batchlab.optim.config), and reports read values by path (batchlab.report). One walk for all.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["get_path", "set_path"]


def get_path(mapping: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """Read the value at a dotted path, or `default` when any key is missing.

    Args:
      mapping: nested mappings.
      path: a dotted path.
      default: returned when the path does not exist.
    """
    node: Any = mapping
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def set_path(mapping: MutableMapping[str, Any], path: str, value: Any) -> None:
    """Write value at a dotted path, creating missing mappings on the way.

    Args:
      mapping: nested mutable mappings, changed in place.
      path: a dotted path, e.g. "optimizer.weights.learning_rate.peak_value".
      value: the value to write.

    Raises:
      ValueError: a key on the way holds something other than a mapping (e.g. writing
        "optimizer.learning_rate.peak_value" when learning_rate is a number).
    """
    keys = path.split(".")
    node: Any = mapping
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, MutableMapping):
            where = ".".join(keys[: depth + 1])
            raise ValueError(f"cannot set {path!r}: {where!r} holds {child!r}, not a mapping")
        node = child
    node[keys[-1]] = value
