"""Reading the JSON files of a results folder: stored numbers, read-only copies, and errors that
name the file and the field (ResultsFileError)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchlab.errors import FieldError

__all__ = ["Reader", "ResultsFileError", "freeze", "spec_get", "stored_number", "stored_steps", "thaw"]


def freeze(value: Any) -> Any:
    """Deep read-only copy: mappings become MappingProxyType, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts and lists again (for code that wants mutable JSON data)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def spec_get(mapping: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A spec field by its proto name, or its protobuf JSON (lowerCamelCase) name."""
    if name in mapping:
        return mapping[name]
    return mapping.get(_camel(name), default)


def stored_number(value: Any) -> float:
    """A stored number as float: null -> NaN, "inf"/"-inf"/"nan" strings -> their float."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("inf", "-inf", "+inf", "nan", "infinity",
                                                     "-infinity"):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def stored_steps(value: Any) -> float:
    """A stored steps-to-target: null or "inf" -> math.inf (never reached)."""
    if value is None:
        return math.inf
    number = stored_number(value)
    if math.isnan(number) or number < 0:
        raise TypeError(f"expected steps >= 0, null or \"inf\", got {value!r}")
    return number




class ResultsFileError(FieldError):
    """A stored results file that does not hold what it should, naming the file and the field.

    Args:
      file: the file's path.
      field_path: the field inside it, dotted.
      reason: what is wrong.
    """

    def __init__(self, file: Path | str, field_path: str, reason: str):
        super().__init__(field_path, reason)
        self.file = str(file)
        self.args = (f"{file}: {field_path}: {reason}",)


class Reader:
    """Reads one JSON file; every error names the file and the field path."""

    def __init__(self, path: Path, root: Path):
        self.path = path
        try:
            self.name = str(path.relative_to(root))
        except ValueError:
            self.name = str(path)

    def load(self) -> Any:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: missing (expected a results file)")
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: not valid JSON ({error})") from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: not UTF-8 text ({error})") from error

    def error(self, field: str, message: str) -> ResultsFileError:
        return ResultsFileError(self.path, field, message)

    def get(self, data: Any, field: str, kind: type | tuple[type, ...], *,
            optional: bool = False, default: Any = None) -> Any:
        """data[field's last part], checked against kind (field is a dotted path for errors)."""
        key = field.rsplit(".", 1)[-1]
        if not isinstance(data, Mapping):
            parent = field.rsplit(".", 1)[0] if "." in field else "(top level)"
            raise self.error(parent, f"must be a mapping, got {type(data).__name__}")
        if key not in data or data[key] is None:
            if optional:
                return default
            raise self.error(field, "missing")
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if int in kinds and float not in kinds and isinstance(value, float) \
                and value.is_integer():
            value = int(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(field, f"must be {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(field, f"must be {_kind_names(kinds)}, got {value!r}")
        return value

    def number(self, data: Mapping[str, Any], field: str, *, optional: bool = False) -> float:
        key = field.rsplit(".", 1)[-1]
        if key not in data and optional:
            return math.nan
        if key not in data:
            raise self.error(field, "missing")
        try:
            return stored_number(data[key])
        except TypeError as error:
            raise self.error(field, str(error)) from None


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {dict: "a mapping", Mapping: "a mapping", list: "a list", str: "a string",
             int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
