"""An in-memory Kubernetes API for namespaced custom objects, driven by the reconciler tests.

No API server can run here, so this keeps the rules of one that the Experiment reconciler
depends on: every write bumps metadata.resourceVersion and a patch carrying a stale one fails
409 Conflict; a change of spec bumps metadata.generation; the status subresource is written
only through patch-status (a main-resource patch ignores status, a status patch ignores the
rest); patches are JSON merge patches (RFC 7386: null removes a key); deleting an object with
finalizers only sets deletionTimestamp, and the object goes when its last finalizer is removed;
and, given a CRD, objects are validated against its openAPIV3Schema on create and update with
unknown fields rejected (kubectl's default strict field validation). Failures raise
kubernetes.client.exceptions.ApiException as the real client does. Every API call is recorded
as (resource, verb) in `calls`, so tests can compare it with the RBAC rules in k8s/.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.k8s.kube_schema import crd_validator, schema_errors


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch of `target` by `patch` (a new value; inputs unchanged)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeCustomObjects:
    """The CustomObjectsApi methods the reconciler calls, over objects held in memory.

    Args:
      crd: a CustomResourceDefinition whose served version's schema validates objects, or None.
    """

    def __init__(self, crd: Mapping[str, Any] | None = None):
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._versions = itertools.count(1)
        self.calls: list[tuple[str, str]] = []
        self._validator = crd_validator(crd) if crd is not None else None

    # -- what a user (kubectl) does -------------------------------------------------------------
    def create(self, namespace: str, body: Mapping[str, Any], plural: str = "experiments"
               ) -> dict[str, Any]:
        """kubectl create: a new object (status dropped, as with a status subresource)."""
        obj = copy.deepcopy(dict(body))
        obj.pop("status", None)
        self._validate(obj)
        name = obj["metadata"]["name"]
        if (namespace, plural, name) in self._objects:
            raise ApiException(status=409, reason=f"{plural} {name!r} already exists")
        obj["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), generation=1,
                               resourceVersion=str(next(self._versions)),
                               creationTimestamp="2026-01-01T00:00:00Z")
        self._objects[(namespace, plural, name)] = obj
        return copy.deepcopy(obj)

    def update_spec(self, namespace: str, name: str, spec: Mapping[str, Any],
                    plural: str = "experiments") -> dict[str, Any]:
        """kubectl apply of a changed spec."""
        obj = self._get(namespace, plural, name)
        changed = merge_patch(obj, {"spec": None})
        changed["spec"] = copy.deepcopy(dict(spec))
        self._validate(changed)
        return self._store(namespace, plural, name, changed, spec_changed=obj["spec"] != spec)

    def delete(self, namespace: str, name: str, plural: str = "experiments") -> None:
        """kubectl delete: gone at once without finalizers, else marked for deletion."""
        obj = self._get(namespace, plural, name)
        if not obj["metadata"].get("finalizers"):
            del self._objects[(namespace, plural, name)]
            return
        if not obj["metadata"].get("deletionTimestamp"):
            obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
            obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def get(self, namespace: str, name: str, plural: str = "experiments") -> dict[str, Any] | None:
        """The stored object (a copy), or None."""
        obj = self._objects.get((namespace, plural, name))
        return copy.deepcopy(obj) if obj is not None else None

    # -- kubernetes.client.CustomObjectsApi -----------------------------------------------------
    def list_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                      plural: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((plural, "list"))
        items = [copy.deepcopy(o) for (ns, p, _), o in sorted(self._objects.items())
                 if ns == namespace and p == plural]
        return {"apiVersion": f"{group}/{version}", "kind": "List", "items": items,
                "metadata": {"resourceVersion": str(next(self._versions))}}

    def patch_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                       plural: str, name: str, body: Mapping[str, Any],
                                       **kwargs: Any) -> dict[str, Any]:
        self.calls.append((plural, "patch"))
        obj = self._get(namespace, plural, name)
        self._check_version(obj, body)
        patch = {k: v for k, v in body.items() if k != "status"}
        changed = merge_patch(obj, patch)
        changed["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
        self._validate(changed)
        return self._store(namespace, plural, name, changed,
                           spec_changed=changed.get("spec") != obj.get("spec"))

    def patch_namespaced_custom_object_status(self, group: str, version: str, namespace: str,
                                              plural: str, name: str, body: Mapping[str, Any],
                                              **kwargs: Any) -> dict[str, Any]:
        self.calls.append((f"{plural}/status", "patch"))
        obj = self._get(namespace, plural, name)
        self._check_version(obj, body)
        changed = copy.deepcopy(obj)
        status = merge_patch(obj.get("status"), body.get("status") or {})
        changed["status"] = status
        self._validate(changed)
        return self._store(namespace, plural, name, changed, spec_changed=False)

    # -- rules ----------------------------------------------------------------------------------
    def _get(self, namespace: str, plural: str, name: str) -> dict[str, Any]:
        obj = self._objects.get((namespace, plural, name))
        if obj is None:
            raise ApiException(status=404, reason=f"{plural} {name!r} not found")
        return obj

    @staticmethod
    def _check_version(obj: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict: the object has been modified")

    def _validate(self, obj: Mapping[str, Any]) -> None:
        if self._validator is None:
            return
        errors = schema_errors(self._validator, obj)
        if errors:
            raise ApiException(status=422, reason="Invalid: " + "; ".join(errors))

    def _store(self, namespace: str, plural: str, name: str, obj: dict[str, Any], *,
               spec_changed: bool) -> dict[str, Any]:
        meta = obj["metadata"]
        if spec_changed:
            meta["generation"] = int(meta.get("generation", 1)) + 1
        meta["resourceVersion"] = str(next(self._versions))
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self._objects[(namespace, plural, name)]
        else:
            self._objects[(namespace, plural, name)] = obj
        return copy.deepcopy(obj)
