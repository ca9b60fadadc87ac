"""The batchlab.io/v1 Experiment resource: its CRD is generated from protos/ (the committed file
is the generator's output), it is a valid structural CRD, every shipped spec passes its schema,
a malformed spec fails it, and the experiments overlay carries Experiments that are copies of
the spec files. No API server runs here: objects are validated as one would (kube_schema)."""

from __future__ import annotations

import copy

import pytest
import yaml

from batchlab.proto import crd
from tests.k8s.kube_schema import crd_validator, schema_errors
from tests.k8s.objects import REPO_ROOT, by_name, kubernetes_validate, of_kind

CRD_FILE = REPO_ROOT / "k8s" / "base" / "experiment-crd.yaml"
SPECS = sorted((REPO_ROOT / "experiments").rglob("*.yaml"))


@pytest.fixture(scope="module")
def experiment_crd() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


@pytest.fixture(scope="module")
def validator(experiment_crd):
    return crd_validator(experiment_crd, crd.VERSION)


def _spec(path):
    from batchlab.search.spec import read_yaml

    return read_yaml(path)


def test_committed_crd_is_the_generated_one():
    assert CRD_FILE.read_text() == crd.render_crd(), (
        "k8s/base/experiment-crd.yaml is stale (protos/ changed): run "
        "python -m batchlab.proto.crd --write")


def test_crd_validates_strictly_as_a_kubernetes_object(tmp_path):
    path = tmp_path / "crd.yaml"
    path.write_text(CRD_FILE.read_text())
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def _structural_problems(schema: dict, where: str = "", *, in_junction: bool = False,
                         preserved: bool = False) -> list[str]:
    """The API server's structural-schema rules the generator must keep (apiextensions
    "Specifying a structural schema"): every node has a type unless it preserves unknown
    fields or is int-or-string; junctions (allOf, anyOf, oneOf, not) hold no type,
    description or default; properties and additionalProperties are not combined."""
    problems = []
    if in_junction:
        for key in ("type", "description", "default", "additionalProperties", "nullable"):
            if key in schema:
                problems.append(f"{where}: {key} inside allOf/anyOf/oneOf/not")
    elif not preserved and "type" not in schema and not (
            schema.get("x-kubernetes-preserve-unknown-fields")
            or schema.get("x-kubernetes-int-or-string")):
        problems.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: properties with additionalProperties")
    keep = preserved or bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    for name, child in (schema.get("properties") or {}).items():
        problems += _structural_problems(child, f"{where}.{name}", in_junction=in_junction,
                                         preserved=keep)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += _structural_problems(schema[key], f"{where}.{key}",
                                             in_junction=in_junction, preserved=keep)
    for key in ("allOf", "anyOf", "oneOf"):
        for i, child in enumerate(schema.get(key) or ()):
            problems += _structural_problems(child, f"{where}.{key}[{i}]", in_junction=True)
    if isinstance(schema.get("not"), dict):
        problems += _structural_problems(schema["not"], f"{where}.not", in_junction=True)
    return problems


def test_crd_schema_is_structural(experiment_crd):
    (version,) = experiment_crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert not _structural_problems(schema)
    assert _structural_problems({"properties": {"x": {}}}) == [": no type", ".x: no type"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["State"] == ".status.state" and columns["Best"] == ".status.bestSoFar"


def test_spec_schema_follows_the_proto():
    """Every ExperimentSpec field is in the schema under its proto name, enums by value name."""
    from batchlab.proto.v1 import experiment_pb2

    spec = crd.experiment_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]

    def check(descriptor, schema, where):
        assert set(schema["properties"]) == {f.name for f in descriptor.fields}, where
        for field in descriptor.fields:
            node = schema["properties"][field.name]
            if field.is_repeated and not (
                    field.message_type and field.message_type.GetOptions().map_entry):
                assert node["type"] == "array", (where, field.name)
                node = node["items"]
            if field.enum_type is not None:
                assert node["enum"] == [v.name for v in field.enum_type.values]
            elif field.message_type is not None and not field.message_type.full_name.startswith(
                    "google.protobuf."):
                check(field.message_type, node, f"{where}.{field.name}")

    check(experiment_pb2.ExperimentSpec.DESCRIPTOR, spec, "spec")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_spec_is_a_valid_experiment(path, validator):
    errors = schema_errors(validator, crd.experiment_manifest(_spec(path), name="x"))
    assert not errors, "\n".join(errors)


MALFORMED = [
    ("trials_per_study", "four", "spec/trials_per_study"),
    ("selection", "BEST", "spec/selection"),
    ("optimisers", [], "spec"),
    ("resources", {"gpus": -1}, "spec/resources/gpus"),
    ("max_total_trials", 2**32, "spec/max_total_trials"),
]


@pytest.mark.parametrize("field,value,where", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_spec_is_rejected_by_the_schema(field, value, where, validator):
    spec = copy.deepcopy(_spec(REPO_ROOT / "experiments" / "examples" / "minimal.yaml"))
    spec[field] = value
    errors = schema_errors(validator, crd.experiment_manifest(spec))
    assert any(e.startswith(f"{where}:") for e in errors), errors


def test_nested_mistakes_are_rejected_too(validator):
    spec = copy.deepcopy(_spec(REPO_ROOT / "experiments" / "examples" / "minimal.yaml"))
    spec["workloads"][0]["points"][0]["batchsize"] = 128  # misspelt
    parameter = spec["optimizers"][0]["search_space"]["parameters"][0]
    parameter["linear"] = {"min": 0.0, "max": 1.0}  # a second member of the `scale` oneof
    errors = schema_errors(validator, crd.experiment_manifest(spec))
    assert any("points/0" in e and "batchsize" in e for e in errors), errors
    assert any("parameters/0" in e for e in errors), errors


def test_experiments_overlay_carries_copies_of_the_spec_files(rendered, validator):
    objects = rendered("experiments")
    experiments = of_kind(objects, "Experiment")
    assert experiments and len(objects) == len(experiments), "the overlay holds Experiments only"
    for experiment in experiments:
        assert experiment["apiVersion"] == f"{crd.GROUP}/{crd.VERSION}"
        assert experiment["metadata"]["namespace"] == "batchlab"
        assert not schema_errors(validator, experiment)
        name = experiment["spec"]["name"]
        originals = [p for p in SPECS if _spec(p).get("name") == name]
        assert len(originals) == 1, f"{name}: no single experiments/**/*.yaml with that name"
        assert experiment["spec"] == _spec(originals[0]), (
            f"{experiment['metadata']['name']} differs from {originals[0]}: regenerate it with "
            f"python -m batchlab.proto.crd manifest {originals[0].relative_to(REPO_ROOT)}")


def test_the_platform_installs_the_crd_and_the_reconciler_rbac(rendered):
    for build in ("base", "dev", "gpu", "tpu"):
        objects = rendered(build)
        assert f"{crd.PLURAL}.{crd.GROUP}" in by_name(objects, "CustomResourceDefinition")
        binding = by_name(objects, "RoleBinding")["controller-experiments"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "controller",
                                        "namespace": "batchlab"}]
        assert binding["roleRef"]["name"] in by_name(objects, "Role")
