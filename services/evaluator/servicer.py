"""EvaluationService: evaluate a trial's stored checkpoint on held-out data.

Trainers save a checkpoint at every evaluation point and go on training; the controller
asks this service to evaluate each one. A request names the trial, the exact step and the
splits (the training loop's: the training-evaluation subset and validation); the checkpoint
comes from the checkpoint service, its parameters and batch statistics are evaluated with
the training loop's own evaluation (`batchlab.train.evaluate.CheckpointEvaluator`, which keeps
each workload's compiled step and data between requests), and, when the request names a
metric to record, the checkpoint service is told the value (it keeps the best checkpoint by
it) and releases the checkpoint's evaluation hold.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from batchlab.proto.v1 import evaluation_pb2, evaluation_pb2_grpc
from batchlab.rpc.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    handle_errors,
)

if TYPE_CHECKING:
    from batchlab.rpc.metrics import EvaluatorMetrics
    from batchlab.train import RunConfig

__all__ = ["EvaluationServicer"]

log = logging.getLogger(__name__)

# (trial, step or None, folder) -> CheckpointInfo or None: downloads a checkpoint step folder.
Loader = Callable[[str, int | None, Path], Any]
# (config, checkpoint_dir, splits) -> (step, metrics).
Evaluator = Callable[[Any, Path, tuple[str, ...]], tuple[int, dict[str, float]]]
# (trial, step, metric or None, maximize) -> CheckpointInfo: records an evaluation's metric.
Recorder = Callable[[str, int, float | None, bool], Any]


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    """Downloads the checkpoint through the checkpoint service and evaluates it.

    Args:
      load: downloads a trial's checkpoint (see ``Loader``).
      data_dir: datasets folder given to the evaluation runs.
      evaluate: the evaluation function (injected in tests; default: a CheckpointEvaluator).
      record: tells the checkpoint service an evaluated metric (see ``Recorder``); None:
        requests naming ``record_metric`` are refused.
      metrics: the ``EvaluatorMetrics`` of ``make_metrics(...).evaluator``, or None.
    """

    def __init__(self, load: Loader, *, data_dir: str | None = None, evaluate: Evaluator | None = None,
                 record: Recorder | None = None, metrics: EvaluatorMetrics | None = None):
        self._load = load
        self._record = record
        self._metrics = metrics
        self._data_dir = data_dir
        self._evaluate = evaluate or self._default_evaluator()
        # One evaluation at a time: each holds a model and its data on the devices.
        self._lock = threading.Lock()

    def _default_evaluator(self) -> Evaluator:
        from batchlab.train.evaluate import CheckpointEvaluator

        evaluator = CheckpointEvaluator(self._data_dir)

        def evaluate(config: RunConfig, checkpoint_dir: Path,
                     splits: tuple[str, ...]) -> tuple[int, dict[str, float]]:
            return evaluator.evaluate(config, checkpoint_dir, splits=splits)

        return evaluate

    def _config(self, request: evaluation_pb2.EvaluateRequest) -> RunConfig:
        from batchlab.train import RunConfig, get_workload

        if not request.trial:
            raise InvalidArgument("trial", "required")
        try:
            get_workload(request.workload)
        except ValueError as err:
            raise InvalidArgument("workload", str(err).split(": ", 1)[-1]) from None
        hp: dict[str, Any] = json_format.MessageToDict(request.hyperparameters)
        if "optimizer" not in hp:
            raise InvalidArgument("hyperparameters.optimizer", "required (the trial's optimizer config)")
        for field in ("batch_size", "step_budget"):
            if getattr(request, field) <= 0:
                raise InvalidArgument(field, "must be > 0")
        config = RunConfig.for_trial(request.workload, hp, batch_size=request.batch_size,
                                     step_budget=request.step_budget, data_dir=self._data_dir)
        config.validate()
        return config

    @staticmethod
    def _splits(request: evaluation_pb2.EvaluateRequest) -> tuple[str, ...]:
        from batchlab.train.evaluate import evaluation_splits

        allowed = evaluation_splits(request.workload)
        if request.splits:
            splits, field = tuple(request.splits), "splits"
        else:
            splits, field = (request.split or "validation",), "split"
        for i, split in enumerate(splits):
            if split not in allowed:
                where = f"splits[{i}]" if field == "splits" else field
                raise InvalidArgument(where, f"must be one of {list(allowed)} (the splits "
                                             f"{request.workload} evaluates), got {split!r}")
        if len(set(splits)) != len(splits):
            raise InvalidArgument("splits", f"names a split twice: {list(splits)}")
        if request.record_metric and request.record_metric.split("/", 1)[0] not in splits:
            raise InvalidArgument("record_metric", f"must be a metric of the evaluated splits "
                                                   f"{list(splits)}, e.g. "
                                                   f"'{splits[-1]}/accuracy'; got "
                                                   f"{request.record_metric!r}")
        return splits

    @handle_errors
    def Evaluate(self, request: evaluation_pb2.EvaluateRequest,
                 context: grpc.ServicerContext) -> evaluation_pb2.EvaluateResponse:
        config = self._config(request)
        splits = self._splits(request)
        if request.record_metric and self._record is None:
            raise FailedPrecondition("this evaluator has no checkpoint service to record "
                                     "metrics in")
        started = time.perf_counter()
        try:
            step, metrics = self._load_and_evaluate(request, config, splits)
            is_best = self._record_metric(request, step, metrics)
        except Exception as err:
            if self._metrics is not None:
                self._metrics.errors.labels(workload=request.workload, reason=type(err).__name__).inc()
                self._metrics.evaluations.labels(workload=request.workload, outcome="error").inc()
            raise
        if self._metrics is not None:
            self._metrics.evaluations.labels(workload=request.workload, outcome="ok").inc()
            self._metrics.latency.labels(workload=request.workload).observe(time.perf_counter() - started)
        log.info("evaluated %s at step %d: %s", request.trial, step, metrics)
        return evaluation_pb2.EvaluateResponse(step=step, metrics=metrics, is_best=is_best)

    def _record_metric(self, request: evaluation_pb2.EvaluateRequest, step: int,
                       metrics: dict[str, float]) -> bool:
        if not request.record_metric:
            return False
        if request.record_metric not in metrics:
            raise InvalidArgument("record_metric", f"the evaluation reports no "
                                                   f"{request.record_metric!r}; it reports "
                                                   f"{sorted(metrics)}")
        value = metrics[request.record_metric]
        assert self._record is not None  # Evaluate refuses record_metric without a recorder
        # A diverged run's NaN must not become the best checkpoint: record no metric then.
        info = self._record(request.trial, step, value if math.isfinite(value) else None,
                            request.maximize)
        return bool(getattr(info, "is_best", False))

    def _load_and_evaluate(self, request: evaluation_pb2.EvaluateRequest, config: RunConfig,
                           splits: tuple[str, ...]) -> tuple[int, dict[str, float]]:
        wanted = request.step if request.HasField("step") else None
        with tempfile.TemporaryDirectory(prefix="batchlab-eval-") as tmp:
            incoming = Path(tmp) / "incoming"
            try:
                info = self._load(request.trial, wanted, incoming)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    # The checkpoint service refused the client's trial name or step.
                    raise InvalidArgument("trial", error.details().removeprefix("trial: ")
                                          ) from None
                raise
            if info is None:
                raise NotFound(f"checkpoint of {request.trial}")
            if wanted is not None and int(info.step) != wanted:
                # The store served an older intact step instead of a corrupt one: evaluating
                # it would put another step's numbers at this step of the curve.
                raise DataLoss(f"{request.trial} step {wanted} is corrupt (the store offered "
                               f"step {info.step} instead)")
            if self._metrics is not None and getattr(info, "size_bytes", None):
                self._metrics.checkpoint_bytes.labels(workload=request.workload).inc(info.size_bytes)
            checkpoint_dir = Path(tmp) / "checkpoints"
            checkpoint_dir.mkdir()
            incoming.rename(checkpoint_dir / str(info.step))
            with self._lock:
                try:
                    return self._evaluate(config, checkpoint_dir, splits)
                except FileNotFoundError as err:
                    raise FailedPrecondition(str(err)) from err
