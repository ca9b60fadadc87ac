"""The JAX-free workload declarations (batchlab.workloads), which the controller checks specs
against, agree with the training registry and with what a real run reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchlab.train.workloads import WORKLOADS
from batchlab.workloads import DECLARATIONS, HyperparameterError, resolve_hyperparameters


def test_every_registered_workload_is_declared_alike():
    assert set(DECLARATIONS) == set(WORKLOADS)
    for name, workload in WORKLOADS.items():
        declared = DECLARATIONS[name]
        assert declared.kind == workload.kind, name
        assert dict(declared.hyperparameters) == dict(workload.defaults), name
        assert declared.metrics == workload.metrics, name


def test_a_real_run_reports_exactly_the_declared_metrics(baseline):
    declared = DECLARATIONS["mnist1d_resnet1d_small"].metrics
    for point in baseline.eval_points:
        assert set(point) - {"step"} == declared


def test_the_declarations_import_without_jax():
    code = ("import sys, batchlab.workloads, batchlab.search.admission; "
            "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("overrides, field", [
    ({"bn_momentum": "x"}, "workload.bn_momentum"),
    ({"nope": 1}, "workload.nope"),
    ({"label_smoothing": 2.0}, "workload.label_smoothing"),
    (3.0, "workload"),
])
def test_resolution_errors_name_the_field(overrides, field):
    with pytest.raises(HyperparameterError) as info:
        resolve_hyperparameters("mnist1d_resnet1d", DECLARATIONS["mnist1d_resnet1d"]
                                .hyperparameters, overrides)
    assert info.value.field_path == field
