"""The one exception -> status mapping, and the servicer decorator, with a fake context."""

from __future__ import annotations

import errno
import logging

import grpc
import pytest
from fake_context import Aborted, FakeContext

from batchlab.optim.schema import ConfigError
from batchlab.rpc import errors
from batchlab.search import SpecError

Code = grpc.StatusCode


class _PeerError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "peer said no"


# (exception, expected code, text the message must contain, expected field path)
MAPPING = [
    (errors.InvalidArgument("spec.batch_size", "must be > 0"), Code.INVALID_ARGUMENT,
     "spec.batch_size: must be > 0", "spec.batch_size"),
    (SpecError("optimizers[1].search_space", "empty"), Code.INVALID_ARGUMENT,
     "optimizers[1].search_space", "optimizers[1].search_space"),
    (ConfigError("lars.trust_coefficient", "must be finite"), Code.INVALID_ARGUMENT,
     "lars.trust_coefficient: must be finite", "lars.trust_coefficient"),
    (errors.NotFound("experiments/e1"), Code.NOT_FOUND, "experiments/e1 not found", None),
    (errors.AlreadyExists("experiments/e1"), Code.ALREADY_EXISTS, "already exists", None),
    (errors.FailedPrecondition("not prepared"), Code.FAILED_PRECONDITION, "not prepared", None),
    (errors.Unavailable("peer down"), Code.UNAVAILABLE, "peer down", None),
    (errors.DataLoss("corrupt", field_path="sha256"), Code.DATA_LOSS, "corrupt", "sha256"),
    (errors.ResourceExhausted("full"), Code.RESOURCE_EXHAUSTED, "full", None),
    (errors.PermissionDenied("no"), Code.PERMISSION_DENIED, "no", None),
    (errors.Unauthenticated("who"), Code.UNAUTHENTICATED, "who", None),
    (OSError(errno.ENOSPC, "No space left on device"), Code.RESOURCE_EXHAUSTED, "full", None),
    (_PeerError(Code.UNAVAILABLE), Code.UNAVAILABLE, "peer said no", None),
    (_PeerError(Code.DEADLINE_EXCEEDED), Code.UNAVAILABLE, "unavailable", None),
    (_PeerError(Code.INVALID_ARGUMENT), Code.INTERNAL, "internal error", None),
    # A ValueError without a field path is a bug in the servicer (it should have named the field).
    (ValueError("secret detail"), Code.INTERNAL, "internal error", None),
    (KeyError("x"), Code.INTERNAL, "internal error", None),
]


@pytest.mark.parametrize("exc, code, text, field", MAPPING,
                         ids=[type(m[0]).__name__ + "-" + m[1].name for m in MAPPING])
def test_status_for(exc, code, text, field):
    got_code, message = errors.status_for(exc)
    assert got_code == code
    assert text in message
    assert errors.field_path_of(exc) == field
    if code == Code.INTERNAL:
        assert "secret" not in message


def test_invalid_argument_under_prefixes_the_field():
    exc = errors.InvalidArgument("trial", "bad").under("header")
    assert exc.field_path == "header.trial"
    assert str(exc) == "header.trial: bad"


class _Servicer:
    @errors.handle_errors
    def Unary(self, request, context):
        if request == "bad":
            raise errors.InvalidArgument("name", "must not be 'bad'")
        if request == "bug":
            raise RuntimeError("boom")
        if request == "self-abort":
            context.abort(Code.PERMISSION_DENIED, "servicer aborted itself")
        return request.upper()

    @errors.handle_errors
    def Stream(self, request, context):
        yield 1
        if request == "bad":
            raise SpecError("studies[0].workload", "unknown workload")
        yield 2


def test_unary_passes_results_through():
    assert _Servicer().Unary("ok", FakeContext()) == "OK"


def test_unary_client_error_aborts_with_field_metadata(caplog):
    context = FakeContext()
    with caplog.at_level(logging.INFO), pytest.raises(Aborted) as info:
        _Servicer().Unary("bad", context)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.details == "name: must not be 'bad'"
    assert info.value.trailing_metadata == {errors.FIELD_PATH_METADATA_KEY: "name"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_unary_bug_is_internal_and_logged_with_a_reference(caplog):
    with caplog.at_level(logging.INFO), pytest.raises(Aborted) as info:
        _Servicer().Unary("bug", FakeContext())
    assert info.value.code == Code.INTERNAL
    assert "boom" not in info.value.details
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None
    reference = info.value.details.split("reference ")[1].split(";")[0]
    assert reference in logged[0].getMessage()


def test_servicer_abort_is_not_remapped():
    with pytest.raises(Aborted) as info:
        _Servicer().Unary("self-abort", FakeContext())
    assert info.value.code == Code.PERMISSION_DENIED


def test_stream_errors_after_first_message_are_mapped():
    context = FakeContext()
    stream = _Servicer().Stream("bad", context)
    assert next(stream) == 1
    with pytest.raises(Aborted) as info:
        next(stream)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.trailing_metadata[errors.FIELD_PATH_METADATA_KEY] == "studies[0].workload"


def test_stream_passes_messages_through():
    assert list(_Servicer().Stream("ok", FakeContext())) == [1, 2]


def test_client_gone_is_not_reported_as_a_bug(caplog):
    context = FakeContext()
    context.cancel()
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError):
        _Servicer().Unary("bug", context)
    assert context.code() is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
