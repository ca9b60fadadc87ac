"""Checks every request passes before any servicer sees it (installed by ``build_server``).

gRPC's Python server answers a request it cannot decode with INTERNAL ("Exception
deserializing request!"), and a proto3 enum field accepts any number, so without these
checks a client's mistake reaches servicer code as something it cannot handle. Here a request
that fails to decode (bad UTF-8 in a string, nesting past the decoder's depth limit, garbage
bytes) or that holds what no servicer can use becomes INVALID_ARGUMENT naming the field:

* an enum field holding a number its enum does not define;
* a ``google.protobuf.Struct`` / ``Value`` nested deeper than :data:`MAX_STRUCT_DEPTH`;
* a non-finite number in a ``Struct`` / ``Value`` (they hold JSON data, and JSON has no NaN).

Example:
  >>> from batchlab.proto.v1 import experiment_pb2
  >>> check_message(experiment_pb2.Target(goal=7))
  Traceback (most recent call last):
  ...
  batchlab.rpc.errors.InvalidArgument: goal: unknown enum number 7 of batchlab.v1.Goal; ...
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import message as message_lib
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from batchlab.limits import shorten
from batchlab.rpc.errors import InvalidArgument

__all__ = ["MAX_STRUCT_DEPTH", "Undecodable", "check_message", "guarded_deserializer"]

#: Deepest nesting of mappings and lists in a Struct/Value field (optimizer configs use 3-4).
MAX_STRUCT_DEPTH = 16

_VALUE = "google.protobuf.Value"
_STRUCT = "google.protobuf.Struct"
_LIST = "google.protobuf.ListValue"
_JSON_TYPES = frozenset({_VALUE, _STRUCT, _LIST})


class Undecodable:
    """Stands in for a request the deserializer could not decode (handled as INVALID_ARGUMENT).

    Args:
      type_name: the full name of the message type expected.
      reason: the decoder's complaint.
    """

    def __init__(self, type_name: str, reason: str):
        self.type_name = type_name
        self.reason = reason

    def error(self) -> InvalidArgument:
        """The error to end the call with."""
        return InvalidArgument("", f"the request is not a valid {self.type_name} message "
                                   f"({shorten(self.reason, 120)})")


def guarded_deserializer(deserializer: Any) -> Any:
    """Wraps a handler's request deserializer: a decode failure yields an :class:`Undecodable`.

    Args:
      deserializer: the generated ``Message.FromString`` (or None: raw bytes are passed on).
    """
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (message_lib.DecodeError, ValueError, TypeError) as error:
            return Undecodable(type_name, str(error))

    return deserialize


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_json(value: Any, full_name: str, path: str, depth: int) -> None:
    """Checks a Struct / Value / ListValue: depth and finite numbers."""
    if depth > MAX_STRUCT_DEPTH:
        raise InvalidArgument(path, f"nested deeper than {MAX_STRUCT_DEPTH} levels of "
                                    "mappings and lists")
    if full_name == _STRUCT:
        for key, item in value.fields.items():
            _check_json(item, _VALUE, _join(path, shorten(key, 40, quote=False)), depth + 1)
    elif full_name == _LIST:
        for i, item in enumerate(value.values):
            _check_json(item, _VALUE, f"{path}[{i}]", depth + 1)
    else:
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            raise InvalidArgument(path, f"must be a finite number, got {value.number_value!r} "
                                        "(Struct fields hold JSON data)")
        if kind == "struct_value":
            _check_json(value.struct_value, _STRUCT, path, depth)
        elif kind == "list_value":
            _check_json(value.list_value, _LIST, path, depth)


def _check_enum(field: FieldDescriptor, number: int, path: str) -> None:
    if number not in field.enum_type.values_by_number:
        names = [v.name for v in field.enum_type.values]
        raise InvalidArgument(path, f"unknown enum number {number} of "
                                    f"{field.enum_type.full_name}; one of {names}")


def check_message(message: message_lib.Message, path: str = "") -> None:
    """Raises InvalidArgument (with the field path) for what no servicer can use; see above.

    Args:
      message: a decoded request (or part of one).
      path: the field path of ``message`` inside the request ("" for the request).

    Raises:
      InvalidArgument: naming the field.
    """
    descriptor: Descriptor = message.DESCRIPTOR
    if descriptor.full_name in _JSON_TYPES:
        _check_json(message, descriptor.full_name, path, 1)
        return
    for field, value in message.ListFields():
        where = _join(path, field.name)
        if field.type == FieldDescriptor.TYPE_ENUM:
            values = value if field.is_repeated else (value,)
            for i, number in enumerate(values):
                _check_enum(field, number, f"{where}[{i}]" if field.is_repeated else where)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type != FieldDescriptor.TYPE_MESSAGE and \
                        value_field.type != FieldDescriptor.TYPE_ENUM:
                    continue
                for key, item in value.items():
                    item_path = f"{where}[{shorten(str(key), 40)}]"
                    if value_field.type == FieldDescriptor.TYPE_ENUM:
                        _check_enum(value_field, item, item_path)
                    else:
                        check_message(item, item_path)
            elif field.is_repeated:
                for i, item in enumerate(value):
                    check_message(item, f"{where}[{i}]")
            else:
                check_message(value, where)
