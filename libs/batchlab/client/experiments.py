"""A thin, typed client of the controller's ExperimentService."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from batchlab.files import atomic_write
from batchlab.proto.v1 import controller_pb2, controller_pb2_grpc, experiment_pb2
from batchlab.rpc.client import channel as open_channel

__all__ = ["ExperimentClient", "default_controller_address", "spec_request_id"]

CONTROLLER_ADDR_ENV = "BATCHLAB_CONTROLLER_ADDR"
DEFAULT_CONTROLLER_ADDR = "127.0.0.1:50051"


def default_controller_address() -> str:
    """``$BATCHLAB_CONTROLLER_ADDR`` or 127.0.0.1:50051 (the embedded stack)."""
    return os.environ.get(CONTROLLER_ADDR_ENV, "").strip() or DEFAULT_CONTROLLER_ADDR


def spec_request_id(spec: experiment_pb2.ExperimentSpec) -> str:
    """A stable idempotency key for a spec: resubmitting the same spec returns the same experiment."""
    canonical = json.dumps(json_format.MessageToDict(spec), sort_keys=True).encode()
    return "spec-" + hashlib.sha256(canonical).hexdigest()[:32]


class ExperimentClient:
    """Calls the controller.

    Args:
      address: host:port of the controller (default: :func:`default_controller_address`).
      token: bearer token (default: ``$BATCHLAB_AUTH_TOKEN``).
      timeout: seconds per unary call.
    """

    def __init__(self, address: str | None = None, *, token: str | None = None, timeout: float = 30.0):
        self.address = address or default_controller_address()
        token = os.environ.get("BATCHLAB_AUTH_TOKEN") if token is None else token
        self._channel = open_channel(self.address, token=token)
        self._stub = controller_pb2_grpc.ExperimentServiceStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ExperimentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self, spec: experiment_pb2.ExperimentSpec, *, request_id: str | None = None, validate_only: bool = False
    ) -> controller_pb2.Experiment:
        """Submit a spec; the same request id (default: derived from the spec) returns the same experiment."""
        request = controller_pb2.SubmitExperimentRequest(
            spec=spec, request_id=request_id or spec_request_id(spec), validate_only=validate_only
        )
        experiment: controller_pb2.Experiment = self._stub.SubmitExperiment(request, timeout=self._timeout)
        return experiment

    def get(self, name: str) -> controller_pb2.Experiment:
        experiment: controller_pb2.Experiment = self._stub.GetExperiment(
            controller_pb2.GetExperimentRequest(name=_name(name)), timeout=self._timeout
        )
        return experiment

    def list(self, *, page_size: int = 50) -> Iterator[controller_pb2.Experiment]:
        """Every experiment, following page tokens."""
        token = ""
        while True:
            page = self._stub.ListExperiments(
                controller_pb2.ListExperimentsRequest(page_size=page_size, page_token=token), timeout=self._timeout
            )
            yield from page.experiments
            token = page.next_page_token
            if not token:
                return

    def trials(self, parent: str, *, page_size: int = 200) -> Iterator[controller_pb2.Trial]:
        """Every trial under an experiment or a study, following page tokens."""
        token = ""
        while True:
            page = self._stub.ListTrials(
                controller_pb2.ListTrialsRequest(parent=_name(parent), page_size=page_size, page_token=token),
                timeout=self._timeout,
            )
            yield from page.trials
            token = page.next_page_token
            if not token:
                return

    def watch(self, name: str, *, period_seconds: float = 1.0) -> Iterator[controller_pb2.WatchExperimentResponse]:
        """Stream updates until the experiment ends."""
        request = controller_pb2.WatchExperimentRequest(name=_name(name), period_seconds=period_seconds)
        stream: Iterator[controller_pb2.WatchExperimentResponse] = self._stub.WatchExperiment(request)
        return stream

    def cancel(self, name: str) -> controller_pb2.Experiment:
        experiment: controller_pb2.Experiment = self._stub.CancelExperiment(
            controller_pb2.CancelExperimentRequest(name=_name(name)), timeout=self._timeout
        )
        return experiment

    def report(self, name: str, out_dir: str | Path) -> Path:
        """Fetch the report and write report.md and its files under ``out_dir``."""
        report = self._stub.GetReport(controller_pb2.GetReportRequest(name=_name(name)), timeout=120)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "report.md", report.markdown)
        for f in report.files:
            target = (out / f.name).resolve()
            if out.resolve() not in target.parents:
                raise ValueError(f"report file name escapes the output folder: {f.name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.content)
        return out / "report.md"


def _name(name: str) -> str:
    """Accept "experiments/abc" or just "abc"."""
    return name if "/" in name else f"experiments/{name}"


# What gRPC's message says when no connection could be made at all (not an answer).
# The most telling first: (mark in the lower-cased message, reason shown).
_UNREACHABLE_MARKS = (
    ("connection refused", "connection refused"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network is unreachable"),
    ("errors resolving", "its host name does not resolve"),
    ("dns resolution failed", "its host name does not resolve"),
    ("failed to connect", "failed to connect"),
    ("connect failed", "failed to connect"),
)


def _unreachable_reason(details: str) -> str | None:
    lowered = details.lower()
    for mark, reason in _UNREACHABLE_MARKS:
        if mark in lowered:
            return reason
    return None


def describe_error(err: grpc.RpcError, address: str | None = None) -> str:
    """One line for people: the status code and the server's message, or what to do.

    Args:
      err: the failed call.
      address: the controller address that was dialled; with it, a call that could not
        connect at all is described as such, with the address and the way out.
    """
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    details = " ".join((details or "").split())
    if address is not None and code == grpc.StatusCode.UNAVAILABLE:
        reason = _unreachable_reason(details)
        if reason is not None:
            return (f"cannot reach the controller at {address} ({reason}): start the embedded "
                    f"stack with `batchlab up`, or point {CONTROLLER_ADDR_ENV} (or --controller) "
                    "at a running controller")
    if address is not None and code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"{address} answers but is not the batchlab controller (UNIMPLEMENTED: "
                f"{details}): point {CONTROLLER_ADDR_ENV} (or --controller) at the controller, "
                "not another batchlab service")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"UNAUTHENTICATED: {details}; pass the stack's token with --token or "
                "BATCHLAB_AUTH_TOKEN")
    return f"{code.name if code is not None else 'UNKNOWN'}: {details}"


def spec_to_json(spec: experiment_pb2.ExperimentSpec) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    return data
