"""Domain errors of the services and the one mapping from exceptions to gRPC status codes.

Servicer code raises the exceptions below (or a library's ``SpecError`` / ``ConfigError``,
which carry a ``field_path``); :func:`handle_errors` turns them into a status with
``context.abort``. :func:`status_for` is the only place that decides which code an exception
becomes, so a client mistake is never reported as UNKNOWN or INTERNAL: INTERNAL is left for
real bugs, which are logged with a reference the client sees.

Example:
  >>> class Servicer:
  ...     @handle_errors
  ...     def GetThing(self, request, context):
  ...         if not request.name:
  ...             raise InvalidArgument("name", "must not be empty")
  ...         raise NotFound(f"things/{request.name}")
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from batchlab.limits import QUOTE_CHARS, shorten  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

#: Trailing metadata key carrying the offending request field of an error.
FIELD_PATH_METADATA_KEY = "batchlab-field-path"
#: Longest status message (and its log line) a client gets: gRPC sends the message as
#: metadata, whose size is limited (8 KiB by default), and a longer one would turn the answer
#: into RESOURCE_EXHAUSTED. Bad values are quoted with :func:`shorten` well below this.
MAX_MESSAGE_CHARS = 1000

_F = TypeVar("_F", bound=Callable[..., Any])


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... (message cut at {MAX_MESSAGE_CHARS} characters)"


class ServiceError(Exception):
    """Base of the domain errors; each subclass fixes its gRPC status code.

    Args:
      message: what went wrong, for the client.
      field_path: the request field at fault (dotted, ``[i]`` for list items), if any.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, field_path: str | None = None):
        super().__init__(message)
        self.message = message
        self.field_path = field_path


class InvalidArgument(ServiceError):
    """A request field has a bad value; the status names the field.

    Args:
      field_path: the offending request field, e.g. ``"header.trial"``.
      reason: what is wrong with it and what is expected.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field_path: str, reason: str):
        super().__init__(f"{field_path}: {reason}" if field_path else reason,
                         field_path=field_path or None)
        self.reason = reason

    def under(self, prefix: str) -> InvalidArgument:
        """Returns the same error with its field path below ``prefix`` (``header.trial``).

        Args:
          prefix: the enclosing request field, e.g. ``"header"``.
        """
        path = f"{prefix}.{self.field_path}" if self.field_path else prefix
        return InvalidArgument(path, self.reason)


class NotFound(ServiceError):
    """A named resource does not exist.

    Args:
      resource: the resource name that was looked up.
      reason: optional detail (e.g. why nothing usable was found).
    """

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource: str, reason: str | None = None):
        super().__init__(f"{resource} not found" + (f": {reason}" if reason else ""))
        self.resource = resource


class AlreadyExists(ServiceError):
    """A resource to be created exists already.

    Args:
      resource: the resource name.
      reason: optional detail.
    """

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, resource: str, reason: str | None = None):
        super().__init__(f"{resource} already exists" + (f": {reason}" if reason else ""))
        self.resource = resource


class FailedPrecondition(ServiceError):
    """The system is not in a state where the request can run (e.g. data not prepared)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    """A transient failure (a peer is down); the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    """A quota or capacity ran out (e.g. the disk is full)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(ServiceError):
    """Stored or transmitted data is corrupt (its content no longer matches its hash)."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ServiceError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


# Codes of a failed call to another service that mean "try again later" for our caller too.
_TRANSIENT_PEER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def field_path_of(exc: BaseException) -> str | None:
    """Returns the request field an exception blames, or None.

    Args:
      exc: any exception; ``ServiceError``, ``SpecError`` and ``ConfigError`` carry a
        ``field_path`` attribute.
    """
    path = getattr(exc, "field_path", None)
    return path if isinstance(path, str) and path else None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps an exception to the gRPC status a client receives: the ONE mapping.

    * :class:`ServiceError` subclasses: their own code and message.
    * ``ValueError`` with a ``field_path`` (``SpecError``, ``ConfigError``): INVALID_ARGUMENT,
      the message naming the field.
    * ``OSError`` ENOSPC / EDQUOT: RESOURCE_EXHAUSTED.
    * A failed call to another service (``grpc.RpcError``): UNAVAILABLE when the peer was
      unavailable or too slow, INTERNAL otherwise (our request to it was wrong).
    * Anything else: INTERNAL (a bug).

    Args:
      exc: the exception raised by servicer code.

    Returns:
      ``(code, message)``. INTERNAL messages do not include the exception's text.
    """
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    path = field_path_of(exc)
    if isinstance(exc, ValueError) and path is not None:
        text = str(exc)
        message = text if text.startswith(path) else f"{path}: {text}"
        return grpc.StatusCode.INVALID_ARGUMENT, message
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"storage is full: {exc.strerror}"
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        if exc.code() in _TRANSIENT_PEER_CODES:
            return grpc.StatusCode.UNAVAILABLE, f"a dependency is unavailable: {exc.details()}"
    return grpc.StatusCode.INTERNAL, "internal error"


def _client_gone(context: Any) -> bool:
    """Whether the client cancelled or its deadline passed (nothing left to answer)."""
    is_active = getattr(context, "is_active", None)
    try:
        return callable(is_active) and not is_active()
    except Exception:  # A fake or foreign context.
        return False


def _already_aborted(context: Any) -> bool:
    """Whether servicer code called ``context.abort`` itself (it raises a bare Exception)."""
    code = getattr(context, "code", None)
    if not callable(code):
        return False
    try:
        current = code()
    except Exception:  # A fake or foreign context without a readable code.
        return False
    return isinstance(current, grpc.StatusCode) and current != grpc.StatusCode.OK


def abort_with(context: Any, exc: BaseException, method: str = "") -> None:
    """Ends the call with the status :func:`status_for` gives ``exc``; always raises.

    Client errors are logged at INFO; INTERNAL ones with their traceback at ERROR, under a
    reference id that the client's message repeats. The field path (if any) goes to the
    trailing metadata key ``batchlab-field-path``.

    Args:
      context: the ``grpc.ServicerContext`` of the call.
      exc: the exception that ended the call.
      method: the method name, for the log.
    """
    code, message = status_for(exc)
    message = _capped(message)
    if code == grpc.StatusCode.INTERNAL:
        reference = uuid.uuid4().hex[:12]
        logger.error("%s failed (reference %s)", method, reference, exc_info=exc)
        message = f"{message} (reference {reference}; see the server log)"
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    path = field_path_of(exc)
    if path is not None:
        # Metadata values must be printable ASCII: escape whatever a client put in a key.
        ascii_path = ascii(_capped(path))[1:-1]
        context.set_trailing_metadata(((FIELD_PATH_METADATA_KEY, ascii_path),))
    context.abort(code, message)
    # A real context raised above; a fake one may not. Make sure the call still ends.
    raise exc


def handle_errors(method: _F) -> _F:
    """Decorates a servicer method so that any exception ends the call with a proper status.

    Works for all four kinds of method: plain functions (unary or stream responses returned
    whole) and generator functions (server streaming). For a generator, errors raised while
    streaming are mapped too.

    Args:
      method: ``def Method(self, request_or_iterator, context)``; the context must be the
        last positional argument.

    Returns:
      The wrapped method.
    """
    name = method.__qualname__
    # The wrappers keep the method's signature (functools.wraps), which mypy cannot tie to _F:
    # hence the two ignores on the returns below.

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            context = args[-1]
            try:
                yield from method(*args, **kwargs)
            except GeneratorExit:
                raise
            except Exception as exc:
                if _already_aborted(context):
                    raise
                if _client_gone(context):
                    logger.info("%s: the client went away (%s)", name, type(exc).__name__)
                    raise
                abort_with(context, exc, name)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = args[-1]
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            if _already_aborted(context):
                raise
            if _client_gone(context):
                logger.info("%s: the client went away (%s)", name, type(exc).__name__)
                raise
            abort_with(context, exc, name)

    return wrapper  # type: ignore[return-value]
