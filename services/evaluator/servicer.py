"""EvaluationService: evaluate a trial's stored checkpoint on a held-out split."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from batchlab.proto.v1 import evaluation_pb2, evaluation_pb2_grpc
from batchlab.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, handle_errors

__all__ = ["EvaluationServicer"]

log = logging.getLogger(__name__)

# (trial, step or None, folder) -> CheckpointInfo or None: downloads a checkpoint step folder.
Loader = Callable[[str, int | None, Path], Any]
# (config, checkpoint_dir, splits) -> (step, metrics).
Evaluator = Callable[[Any, Path, tuple[str, ...]], tuple[int, dict[str, float]]]


def _default_evaluator(config, checkpoint_dir: Path, splits: tuple[str, ...]):
    from batchlab.train.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(config, checkpoint_dir, splits=splits)


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    """Downloads the checkpoint through the checkpoint service and evaluates it.

    Args:
      load: downloads a trial's checkpoint (see ``Loader``).
      data_dir: datasets folder given to the evaluation runs.
      evaluate: the evaluation function (injected in tests).
      metrics: the ``EvaluatorMetrics`` of ``make_metrics(...).evaluator``, or None.
    """

    def __init__(self, load: Loader, *, data_dir: str | None = None, evaluate: Evaluator | None = None,
                 metrics=None):
        self._load = load
        self._metrics = metrics
        self._data_dir = data_dir
        self._evaluate = evaluate or _default_evaluator
        # One evaluation at a time: each holds a model and its data on the devices.
        self._lock = threading.Lock()

    def _config(self, request: evaluation_pb2.EvaluateRequest):
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

    @handle_errors
    def Evaluate(self, request, context):
        split = request.split or "validation"
        if split not in ("validation", "train"):
            raise InvalidArgument("split", f"must be 'validation' or 'train', got {split!r}")
        config = self._config(request)
        started = time.perf_counter()
        try:
            step, metrics = self._load_and_evaluate(request, config, split)
        except Exception as err:
            if self._metrics is not None:
                self._metrics.errors.labels(workload=request.workload, reason=type(err).__name__).inc()
                self._metrics.evaluations.labels(workload=request.workload, outcome="error").inc()
            raise
        if self._metrics is not None:
            self._metrics.evaluations.labels(workload=request.workload, outcome="ok").inc()
            self._metrics.latency.labels(workload=request.workload).observe(time.perf_counter() - started)
        log.info("evaluated %s at step %d: %s", request.trial, step, metrics)
        return evaluation_pb2.EvaluateResponse(step=step, metrics=metrics)

    def _load_and_evaluate(self, request, config, split: str) -> tuple[int, dict[str, float]]:
        with tempfile.TemporaryDirectory(prefix="batchlab-eval-") as tmp:
            incoming = Path(tmp) / "incoming"
            info = self._load(request.trial, request.step if request.HasField("step") else None, incoming)
            if info is None:
                raise NotFound(f"checkpoint of {request.trial}")
            if self._metrics is not None and getattr(info, "size_bytes", 0):
                self._metrics.checkpoint_bytes.labels(workload=request.workload).inc(info.size_bytes)
            checkpoint_dir = Path(tmp) / "checkpoints"
            checkpoint_dir.mkdir()
            incoming.rename(checkpoint_dir / str(info.step))
            with self._lock:
                try:
                    return self._evaluate(config, checkpoint_dir, (split,))
                except FileNotFoundError as err:
                    raise FailedPrecondition(str(err)) from err
