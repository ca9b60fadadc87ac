"""Custom resources checked as an API server checks them, offline: a CRD's openAPIV3Schema closed
to unknown fields (kubectl's default strict field validation), as a jsonschema validator.
Shared by tests/k8s and the reconciler's in-memory API (tests/services/controller/kube_fake.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema


def closed_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A structural schema with unknown fields refused, except where it preserves them."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: closed_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), Mapping):
            out[key] = closed_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [closed_schema(s) for s in schema[key]]
    return out


def crd_validator(crd: Mapping[str, Any], version: str | None = None) -> jsonschema.Validator:
    """A validator of objects of `crd` at `version` (default: its storage version)."""
    versions = crd["spec"]["versions"]
    (served,) = [v for v in versions if (v["name"] == version if version else v.get("storage"))]
    return jsonschema.Draft7Validator(closed_schema(served["schema"]["openAPIV3Schema"]))


def schema_errors(validator: jsonschema.Validator, obj: Mapping[str, Any]) -> list[str]:
    """'path: message' for every violation (metadata is the API server's, not the schema's)."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    body["metadata"] = {}
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))]
