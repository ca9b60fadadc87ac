"""Code generation from protos/: import rewriting, a clean regeneration, the JSON mapping."""

from __future__ import annotations

import importlib

from google.protobuf import json_format

from batchlab.proto import generate


def test_rewrite_imports():
    text = ("from batchlab.v1 import common_pb2 as batchlab_dot_v1_dot_common__pb2\n"
            "from google.protobuf import struct_pb2 as _struct_pb2\n"
            "import batchlab.v1.common_pb2\n")
    assert generate.rewrite_imports(text) == (
        "from batchlab.proto.v1 import common_pb2 as batchlab_dot_v1_dot_common__pb2\n"
        "from google.protobuf import struct_pb2 as _struct_pb2\n"
        "import batchlab.proto.v1.common_pb2\n")


def test_generate_into_a_fresh_folder(tmp_path):
    written = generate.generate(output_dir=tmp_path)
    names = sorted(p.name for p in written)
    assert "experiment_pb2.py" in names and "experiment_pb2.pyi" in names
    assert "common_pb2_grpc.py" in names and "__init__.py" in names
    for path in written:
        assert "from batchlab.v1 import" not in path.read_text(), path
    assert not generate.is_stale(output_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary files left


def test_generated_modules_import_under_batchlab_proto():
    experiment_pb2 = importlib.import_module("batchlab.proto.v1.experiment_pb2")
    assert experiment_pb2.ExperimentSpec.DESCRIPTOR.full_name == "batchlab.v1.ExperimentSpec"
    assert experiment_pb2.DESCRIPTOR.name == "batchlab/v1/experiment.proto"


def test_json_mapping_rejects_unknown_fields_and_reads_enums_by_name():
    experiment_pb2 = importlib.import_module("batchlab.proto.v1.experiment_pb2")
    spec = json_format.ParseDict(
        {"name": "x", "selection": "FEWEST_STEPS_TO_TARGET",
         "workloads": [{"target": {"goal": "MINIMIZE", "value": 0.0}}]},
        experiment_pb2.ExperimentSpec())
    assert spec.selection == experiment_pb2.FEWEST_STEPS_TO_TARGET
    assert spec.workloads[0].target.HasField("value")  # optional: 0.0 is not "unset"
    try:
        json_format.ParseDict({"nmae": "x"}, experiment_pb2.ExperimentSpec())
    except json_format.ParseError:
        pass
    else:
        raise AssertionError("an unknown field must be an error")
