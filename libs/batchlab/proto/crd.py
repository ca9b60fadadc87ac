"""The ``batchlab.io/v1`` Experiment custom resource, its CRD generated from protos/.

An Experiment's ``spec`` is an ExperimentSpec in the protobuf JSON mapping with the proto's own
field names (what the files under experiments/ hold), so that ``kubectl apply -f`` of an
Experiment carries exactly what ``batchlab submit`` sends. The CRD's OpenAPI v3 schema is
generated here from protos/batchlab/v1 (compiled by grpc_tools' protoc with source info, so the
proto comments become the schema's descriptions and ``kubectl explain experiment.spec`` reads
them): every message is an object that rejects unknown fields, enums are their value names,
integers carry their range, a oneof admits at most one of its fields, and google.protobuf.Struct
and Value (optimizer configs, hyperparameters) admit any JSON. The API server then refuses a
malformed spec before it reaches the controller; what a schema cannot say (ranges that depend on
other fields, registered workload names) the controller checks on submission, and the
Experiment's status says why it was refused. The status is written by the controller's
reconciler (services/controller/reconciler.py); its trial counts are TrialCounts' fields.

The generated file is committed (k8s/base/experiment-crd.yaml) and a test keeps it equal to what
this module generates. After editing protos/:

    python -m batchlab.proto.crd --write      # regenerate k8s/base/experiment-crd.yaml
    python -m batchlab.proto.crd --check      # exit 1 if the committed file is stale

and, to turn a spec file into an Experiment manifest:

    python -m batchlab.proto.crd manifest experiments/examples/minimal.yaml > minimal.yaml

Generating needs grpcio-tools (the dev extra); the constants and `experiment_manifest` do not.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "FINALIZER",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "experiment_crd",
    "experiment_manifest",
    "render_crd",
]

log = logging.getLogger(__name__)

GROUP = "batchlab.io"
VERSION = "v1"
KIND = "Experiment"
PLURAL = "experiments"
SINGULAR = "experiment"
#: Holds a deleted Experiment until the reconciler has cancelled its run.
FINALIZER = f"{GROUP}/cancel-on-delete"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
CRD_PATH = REPO_ROOT / "k8s" / "base" / "experiment-crd.yaml"

_SPEC_MESSAGE = "batchlab.v1.ExperimentSpec"
_COUNTS_MESSAGE = "batchlab.v1.TrialCounts"

# FieldDescriptorProto.Type and .Label numbers (descriptor.proto).
_DOUBLE, _FLOAT, _INT64, _UINT64, _INT32, _FIXED64, _FIXED32, _BOOL, _STRING = range(1, 10)
_MESSAGE, _BYTES, _UINT32, _ENUM, _SFIXED32, _SFIXED64, _SINT32, _SINT64 = range(11, 19)
_REPEATED = 3
_INT_RANGES = {
    _INT32: (-(2**31), 2**31 - 1), _SINT32: (-(2**31), 2**31 - 1),
    _SFIXED32: (-(2**31), 2**31 - 1), _UINT32: (0, 2**32 - 1), _FIXED32: (0, 2**32 - 1),
}
# 64-bit integers are JSON strings in the protobuf JSON mapping (numbers are accepted too).
_INT64_TYPES = {_INT64, _UINT64, _FIXED64, _SFIXED64, _SINT64}
_ANY_JSON = {"x-kubernetes-preserve-unknown-fields": True}
# Well-known types with a JSON form of their own (protobuf JSON mapping).
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    "google.protobuf.Value": dict(_ANY_JSON),
    "google.protobuf.ListValue": {"type": "array", "items": dict(_ANY_JSON)},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.UInt32Value": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
}


# --------------------------------------------------------------------------- proto descriptors


def _descriptor_set(proto_root: Path) -> Any:
    """Compile protos/batchlab/v1 with source info into a FileDescriptorSet."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    # The well-known types' .proto files ship with grpc_tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "batchlab" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory(prefix="batchlab-crd-") as tmp:
        out = Path(tmp) / "descriptors.pb"
        status = protoc.main([
            "grpc_tools.protoc", f"--proto_path={proto_root}", f"--proto_path={well_known}",
            "--include_imports", "--include_source_info", f"--descriptor_set_out={out}", *files,
        ])
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status} on {proto_root}")
        descriptors = descriptor_pb2.FileDescriptorSet()
        descriptors.ParseFromString(out.read_bytes())
    return descriptors


class _Protos:
    """Messages and enums of a FileDescriptorSet by full name, with their comments."""

    def __init__(self, descriptors: Any):
        self.messages: dict[str, Any] = {}
        self.enums: dict[str, Any] = {}
        self.comments: dict[tuple[str, ...], str] = {}
        for file in descriptors.file:
            comments = {tuple(loc.path): _clean(loc.leading_comments)
                        for loc in file.source_code_info.location if loc.leading_comments}
            prefix = f"{file.package}." if file.package else ""
            for i, message in enumerate(file.message_type):
                self._add_message(prefix, message, (4, i), comments)
            for enum in file.enum_type:
                self.enums[prefix + enum.name] = enum

    def _add_message(self, prefix: str, message: Any, path: tuple[int, ...],
                     comments: Mapping[tuple[int, ...], str]) -> None:
        name = prefix + message.name
        self.messages[name] = message
        if path in comments:
            self.comments[(name,)] = comments[path]
        for j, field in enumerate(message.field):
            text = comments.get((*path, 2, j))
            if text:
                self.comments[(name, field.name)] = text
        for j, nested in enumerate(message.nested_type):
            self._add_message(name + ".", nested, (*path, 3, j), comments)
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum


def _clean(comment: str) -> str:
    """One paragraph from a proto comment (line breaks inside sentences joined)."""
    return " ".join(line.strip() for line in comment.strip().splitlines() if line.strip())


def _with_description(schema: dict[str, Any], text: str | None) -> dict[str, Any]:
    if text:
        schema = {"description": text, **schema}
    return schema


def _field_schema(protos: _Protos, message_name: str, field: Any,
                  stack: tuple[str, ...]) -> dict[str, Any]:
    """The schema of one field's value (an item's, for a repeated field)."""
    if field.type == _MESSAGE:
        type_name = field.type_name.lstrip(".")
        entry = protos.messages[type_name]
        if entry.options.map_entry:
            value_field = next(f for f in entry.field if f.name == "value")
            return {"type": "object",
                    "additionalProperties": _field_schema(protos, type_name, value_field, stack)}
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        return _message_schema(protos, type_name, stack)
    if field.type == _ENUM:
        enum = protos.enums[field.type_name.lstrip(".")]
        return {"type": "string", "enum": [value.name for value in enum.value]}
    if field.type in (_DOUBLE, _FLOAT):
        return {"type": "number"}
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return {"type": "integer", "minimum": low, "maximum": high}
    if field.type in _INT64_TYPES:
        pattern = r"^[0-9]+$" if field.type in (_UINT64, _FIXED64) else r"^-?[0-9]+$"
        return {"x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string", "pattern": pattern}]}
    if field.type == _BOOL:
        return {"type": "boolean"}
    if field.type == _STRING:
        return {"type": "string"}
    if field.type == _BYTES:
        return {"type": "string", "format": "byte"}
    raise ValueError(f"{message_name}.{field.name}: unsupported field type {field.type}")


def _message_schema(protos: _Protos, name: str, stack: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object schema for a message: its fields, closed to unknown ones, oneofs exclusive."""
    if name in stack:
        raise ValueError(f"{' -> '.join((*stack, name))}: recursive messages have no "
                         "structural schema")
    message = protos.messages[name]
    properties: dict[str, Any] = {}
    for field in message.field:
        value_schema = _field_schema(protos, name, field, (*stack, name))
        if field.label == _REPEATED and not _is_map(protos, field):
            value_schema = {"type": "array", "items": value_schema}
        properties[field.name] = _with_description(value_schema,
                                                   protos.comments.get((name, field.name)))
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    exclusive = _oneof_pairs(message)
    if exclusive:
        # A oneof holds at most one of its fields (the JSON mapping refuses two).
        schema["not"] = {"anyOf": [{"required": list(pair)} for pair in exclusive]}
    return _with_description(schema, protos.comments.get((name,)))


def _is_map(protos: _Protos, field: Any) -> bool:
    if field.type != _MESSAGE:
        return False
    return bool(protos.messages[field.type_name.lstrip(".")].options.map_entry)


def _oneof_pairs(message: Any) -> list[tuple[str, str]]:
    """Pairs of fields that share a real oneof (proto3 `optional` makes synthetic ones)."""
    members: dict[int, list[str]] = {}
    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            members.setdefault(field.oneof_index, []).append(field.name)
    return [pair for names in members.values() for pair in itertools.combinations(names, 2)]


# --------------------------------------------------------------------------- the CRD


def _status_schema(protos: _Protos) -> dict[str, Any]:
    counts = _message_schema(protos, _COUNTS_MESSAGE)
    counts["properties"]["total"] = {"type": "integer", "minimum": 0,
                                     "description": "All trials, whatever their state."}
    best_item = {
        "type": "object",
        "description": "The best final value of one workload's target metric among its "
                       "finished trials so far.",
        "properties": {
            "workload": {"type": "string"},
            "metric": {"type": "string"},
            "goal": {"type": "string", "enum": ["MAXIMIZE", "MINIMIZE"]},
            "value": {"type": "number"},
            "study": {"type": "string"},
            "trial": {"type": "string", "description": "The trial's resource name."},
        },
    }
    return {
        "type": "object",
        "description": "Written by the controller's reconciler; never by users.",
        "properties": {
            "experiment": {"type": "string", "description": "The controller's resource name "
                           "(experiments/{id}), for the batchlab CLI."},
            "state": {"type": "string", "description": "The controller's state (PENDING, "
                      "RUNNING, SUCCEEDED, FAILED, CANCELLED), or REJECTED when the controller "
                      "refused the spec (see message)."},
            "message": {"type": "string", "description": "Why it was refused or failed, or "
                        "what the reconciler is waiting for."},
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "The metadata.generation that was submitted."},
            "trials": counts,
            "best": {"type": "array", "items": best_item},
            "bestSoFar": {"type": "string", "description": "best[0] in one line, for kubectl get."},
            "waiting": {"type": "string", "description": "Why the experiment's runs wait (e.g. "
                        "for a TPU slice to scale up), while they do."},
            "report": {
                "type": "object",
                "description": "Where the report is, once the experiment ended.",
                "properties": {
                    "path": {"type": "string", "description": "report.md on the controller's "
                             "state volume."},
                    "command": {"type": "string", "description": "How to fetch it with the CLI."},
                },
            },
            "lastUpdateTime": {"type": "string", "format": "date-time"},
        },
    }


_PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Pending", "type": "integer", "jsonPath": ".status.trials.pending"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.trials.running"},
    {"name": "Succeeded", "type": "integer", "jsonPath": ".status.trials.succeeded"},
    {"name": "Diverged", "type": "integer", "jsonPath": ".status.trials.diverged"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.trials.failed"},
    {"name": "Best", "type": "string", "jsonPath": ".status.bestSoFar"},
    {"name": "Waiting", "type": "string", "jsonPath": ".status.waiting", "priority": 1},
    {"name": "Experiment", "type": "string", "jsonPath": ".status.experiment", "priority": 1},
    {"name": "Report", "type": "string", "jsonPath": ".status.report.path", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def experiment_crd(proto_root: Path = PROTO_ROOT) -> dict[str, Any]:
    """The Experiment CustomResourceDefinition, its spec schema generated from `proto_root`.

    Args:
      proto_root: the folder holding batchlab/v1/*.proto.

    Raises:
      RuntimeError: protoc failed on the protos (its message is printed).
    """
    protos = _Protos(_descriptor_set(proto_root))
    spec = _message_schema(protos, _SPEC_MESSAGE)
    spec["description"] = (
        "The experiment to run: a batchlab.v1.ExperimentSpec in the protobuf JSON mapping with "
        "the proto's field names, exactly as in the files under experiments/. name defaults to "
        "metadata.name. Changing it after submission has no effect: delete the Experiment "
        "(which cancels its run) and create a new one. " + spec.get("description", ""))
    schema = {
        "type": "object",
        "description": "An optimizer comparison run by batchlab's controller. Deleting it "
                       "cancels the run.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": _status_schema(protos),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "batchlab",
                       "app.kubernetes.io/component": "controller"},
        },
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": SINGULAR, "shortNames": ["exp"], "categories": ["batchlab"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


_HEADER = """\
# GENERATED by `python -m batchlab.proto.crd --write` from protos/batchlab/v1: do not edit.
# The batchlab.io/v1 Experiment resource; its spec is an ExperimentSpec (protobuf JSON mapping,
# the proto's field names). tests/k8s checks this file equals what the generator writes.
"""


def render_crd(proto_root: Path = PROTO_ROOT) -> str:
    """The CRD as the YAML text committed under k8s/."""
    text: str = yaml.safe_dump(experiment_crd(proto_root), sort_keys=False, width=100)
    return _HEADER + text


def experiment_manifest(spec: Mapping[str, Any], *, name: str | None = None,
                        namespace: str | None = None) -> dict[str, Any]:
    """An Experiment object carrying `spec` (a parsed spec file).

    Args:
      spec: the ExperimentSpec as plain data (the JSON mapping, e.g. a spec file's YAML).
      name: metadata.name (default: the spec's name, '_' replaced by '-').
      namespace: metadata.namespace (default: none, as kustomize sets it).
    """
    object_name = name or str(spec.get("name", "")).replace("_", "-")
    if not object_name:
        raise ValueError("name: the spec has no name; give the Experiment's name")
    metadata: dict[str, Any] = {"name": object_name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata,
            "spec": dict(spec)}


def _read_spec(path: Path) -> dict[str, Any]:
    from batchlab.search.spec import read_yaml

    spec: dict[str, Any] = read_yaml(path)
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write or check the CRD, or print an Experiment manifest for a spec."""
    parser = argparse.ArgumentParser(prog="python -m batchlab.proto.crd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {CRD_PATH}")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the committed CRD differs from the generated one")
    parser.add_argument("--out", type=Path, default=CRD_PATH, help="the CRD file")
    sub = parser.add_subparsers(dest="command")
    manifest = sub.add_parser("manifest", help="print an Experiment for a spec file")
    manifest.add_argument("spec", type=Path)
    manifest.add_argument("--name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "manifest":
        data = _read_spec(args.spec)
        sys.stdout.write(yaml.safe_dump(experiment_manifest(data, name=args.name),
                                        sort_keys=False, width=100))
        return 0
    text = render_crd()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            log.error("%s is stale: run python -m batchlab.proto.crd --write", args.out)
            return 1
        return 0
    if args.write:
        args.out.write_text(text)
        log.info("wrote %s", args.out)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
