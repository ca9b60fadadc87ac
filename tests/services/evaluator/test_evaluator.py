"""The evaluation service: argument errors, a missing checkpoint, and a real checkpoint evaluated."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from fake_context import Aborted, FakeContext
from google.protobuf import struct_pb2

from batchlab.proto.v1 import evaluation_pb2
from services.evaluator.servicer import EvaluationServicer

HP = {"optimizer": {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.9}, "workload": {}}


def _request(**overrides):
    hp = struct_pb2.Struct()
    hp.update(HP)
    fields = dict(trial="experiments/e/studies/s/trials/0-r0", workload="mnist1d_resnet1d_small",
                  hyperparameters=hp, batch_size=32, step_budget=20)
    fields.update(overrides)
    return evaluation_pb2.EvaluateRequest(**fields)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"workload": "mnist2d"}, "workload"),
        ({"split": "test"}, "split"),
        ({"batch_size": 0}, "batch_size"),
        ({"trial": ""}, "trial"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(overrides, field):
    servicer = EvaluationServicer(lambda *a: None, evaluate=lambda *a: (0, {}))
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.Evaluate(_request(**overrides), ctx)
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in ctx.details()


def test_missing_checkpoint_is_not_found():
    servicer = EvaluationServicer(lambda *a: None, evaluate=lambda *a: (0, {}))
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.Evaluate(_request(), ctx)
    assert ctx.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_evaluates_a_real_checkpoint_like_the_training_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    from batchlab.data import prepare
    from batchlab.train import RunConfig, train_and_evaluate

    data_dir = tmp_path / "data"
    prepare("mnist1d", data_dir, config="small")
    ckpt = tmp_path / "ckpt"
    config = RunConfig(workload="mnist1d_resnet1d_small", optimizer=HP["optimizer"], batch_size=32,
                       total_steps=20, eval_every_steps=10, data_dir=str(data_dir), checkpoint_dir=str(ckpt))
    result = train_and_evaluate(config)
    assert result.outcome.name == "SUCCEEDED"

    def load(trial, step, folder: Path):
        steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
        chosen = steps[-1] if step is None else step
        shutil.copytree(ckpt / str(chosen), folder)
        return SimpleNamespace(step=chosen)

    servicer = EvaluationServicer(load, data_dir=str(data_dir))
    response = servicer.Evaluate(_request(), FakeContext())
    assert response.step == 20
    # The same numbers the training loop recorded at its last evaluation.
    assert response.metrics["validation/accuracy"] == pytest.approx(result.curve[-1]["validation/accuracy"], abs=1e-6)
    assert response.metrics["validation/loss"] == pytest.approx(result.curve[-1]["validation/loss"], rel=1e-5)
    # Every split of every point, exactly; a second trial with other hyperparameters reuses
    # the compiled evaluation (only parameters and batch statistics are read), and the
    # model's initialisation is not traced again for each checkpoint.
    from batchlab.train import loop

    traced = []
    real_variables = loop._Run._variables
    monkeypatch.setattr(loop._Run, "_variables",
                        lambda self, *args: traced.append(1) or real_variables(self, *args))
    for step in (10, 20):
        response = servicer.Evaluate(_request(step=step, splits=["train", "validation"]),
                                     FakeContext())
        point = next(p for p in result.curve if p["step"] == step)
        assert dict(response.metrics) == {k: v for k, v in point.items()
                                          if k.startswith(("train/", "validation/"))
                                          and k != "train/batch_loss"}
    assert traced == []


def _load_at(step):
    def load(trial, wanted, folder: Path):
        folder.mkdir(parents=True)
        return SimpleNamespace(step=step, size_bytes=0)

    return load


def test_splits_are_evaluated_together_and_named_by_index_when_wrong():
    calls = []

    def evaluate(config, checkpoint_dir, splits):
        calls.append(splits)
        return 10, {f"{s}/accuracy": 0.5 for s in splits}

    servicer = EvaluationServicer(_load_at(10), evaluate=evaluate)
    response = servicer.Evaluate(_request(step=10, splits=["train", "validation"]), FakeContext())
    assert calls == [("train", "validation")]
    assert dict(response.metrics) == {"train/accuracy": 0.5, "validation/accuracy": 0.5}
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.Evaluate(_request(splits=["validation", "test"]), ctx)
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT and ctx.details().startswith("splits[1]")


def test_an_exact_step_is_never_replaced_by_an_older_one():
    servicer = EvaluationServicer(_load_at(10), evaluate=lambda *a: (10, {}))
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.Evaluate(_request(step=20), ctx)
    assert ctx.code() == grpc.StatusCode.DATA_LOSS and "step 20" in ctx.details()


def test_the_recorded_metric_goes_to_the_checkpoint_service():
    recorded = []

    def record(trial, step, metric, maximize):
        recorded.append((trial, step, metric, maximize))
        return SimpleNamespace(is_best=True)

    values = {"validation/accuracy": 0.75, "validation/loss": float("nan")}
    servicer = EvaluationServicer(_load_at(10), evaluate=lambda *a: (10, dict(values)),
                                  record=record)
    response = servicer.Evaluate(_request(step=10, record_metric="validation/accuracy",
                                          maximize=True), FakeContext())
    assert response.is_best and recorded == [(_request().trial, 10, 0.75, True)]
    # A non-finite metric (a diverged run) is not a candidate for the best checkpoint.
    servicer.Evaluate(_request(step=10, record_metric="validation/loss"), FakeContext())
    assert recorded[-1] == (_request().trial, 10, None, False)
    for metric in ("train/accuracy", "validation/nope"):
        ctx = FakeContext()
        with pytest.raises(Aborted):
            servicer.Evaluate(_request(step=10, record_metric=metric), ctx)
        assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ctx.details().startswith("record_metric")
