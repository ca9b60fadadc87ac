"""Mistaken Evaluate requests are INVALID_ARGUMENT naming the field, never INTERNAL (issue 9,
part 4): the hyperparameters a client sends go through the same checks as a spec's."""

from __future__ import annotations

import grpc
import pytest
from fake_context import Aborted, FakeContext
from google.protobuf import json_format

from batchlab.proto.v1 import evaluation_pb2
from services.evaluator.servicer import EvaluationServicer

OPTIMIZER = {"optimizer": "nesterov", "learning_rate": 0.1}


@pytest.mark.parametrize("hyperparameters, field", [
    ({"optimizer": OPTIMIZER, "workload": {"bn_momentum": "high"}}, "workload.bn_momentum"),
    ({"optimizer": OPTIMIZER, "workload": {"dropout": 0.1}}, "workload.dropout"),
    ({"optimizer": OPTIMIZER, "workload": 3}, "workload"),
    ({"optimizer": {"optimizer": ["nesterov"], "learning_rate": 0.1}}, "optimizer.optimizer"),
    ({"optimizer": 5}, "optimizer"),
])
def test_bad_hyperparameters_name_the_field(hyperparameters, field):
    loads = []
    servicer = EvaluationServicer(lambda *args: loads.append(args),
                                  evaluate=lambda *args: (1, {}))
    request = evaluation_pb2.EvaluateRequest(
        trial="experiments/e/studies/s/trials/0-r0", workload="mnist1d_resnet1d_small",
        batch_size=32, step_budget=10)
    json_format.ParseDict(hyperparameters, request.hyperparameters)
    with pytest.raises(Aborted) as info:
        servicer.Evaluate(request, FakeContext())
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, info.value.details
    assert info.value.details.startswith(field)
    assert not loads  # refused before any checkpoint was fetched


class _Refused(grpc.RpcError):
    """What the checkpoint client raises when the checkpoint service refuses a request."""

    def code(self):
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self):
        return "trial: segments may only use [A-Za-z0-9._-]; got '\\n' in '\\n'"


def test_a_trial_name_the_checkpoint_service_refuses_is_the_clients_mistake():
    def load(*args):
        raise _Refused()

    servicer = EvaluationServicer(load, evaluate=lambda *args: (1, {}))
    request = evaluation_pb2.EvaluateRequest(trial="\n", workload="mnist1d_resnet1d_small",
                                             batch_size=32, step_budget=10)
    json_format.ParseDict({"optimizer": OPTIMIZER}, request.hyperparameters)
    with pytest.raises(Aborted) as info:
        servicer.Evaluate(request, FakeContext())
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("trial: segments may only use")
