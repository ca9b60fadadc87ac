"""Builds and runs a gRPC server the same way for every service.

:func:`build_server` registers the servicers, the standard ``grpc.health.v1`` service
(overall ``""`` and each service name SERVING; NOT_SERVING once stopping), an optional
bearer-token check, and optional per-RPC metrics. :func:`serve` runs it until SIGTERM or
SIGINT and then stops gracefully. :func:`settings_from_env` reads the usual environment
variables of a service's ``server.py``.

Example:
  >>> from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc
  >>> reg = Registration.for_service(
  ...     checkpoints_pb2, checkpoints_pb2_grpc, "CheckpointService", servicer)  # doctest: +SKIP
  >>> server = build_server([reg], service_name="checkpoints")  # doctest: +SKIP
  >>> server.start(); server.port  # doctest: +SKIP
  50123
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from types import ModuleType
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY, InvalidArgument

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
AUTH_METADATA_KEY = "authorization"

BIND_HOST_ENV = "BATCHLAB_BIND_HOST"
AUTH_TOKEN_ENV = "BATCHLAB_AUTH_TOKEN"
METRICS_PORT_ENV = "BATCHLAB_METRICS_PORT"
SHUTDOWN_GRACE_ENV = "BATCHLAB_SHUTDOWN_GRACE_SECONDS"
# What a deployable binds when BATCHLAB_BIND_HOST is unset: every interface, so that probes and
# peers in the cluster reach it.
DEFAULT_BIND_HOST = "0.0.0.0"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Exit status of a service that cannot start because of a bad setting: starting it again
#: cannot help (batchlab up retries other failed starts, not this one).
EXIT_CONFIGURATION = 2
# Streaming calls open at once per server and per client host (see StreamLimitInterceptor):
# far above what the CLI, dashboards and trainers open, and each idle one costs a thread.
DEFAULT_MAX_STREAMS = 256
DEFAULT_MAX_STREAMS_PER_CLIENT = 128

# A servicer method as gRPC calls it: (request or request iterator, context) -> response or
# response iterator. grpc ships no types, so requests, responses and contexts are Any.
Behaviour = Callable[[Any, Any], Any]
# An interceptor's rewrite of a behaviour: wrap(behaviour, response_streaming) -> behaviour.
Wrap = Callable[[Behaviour, bool], Behaviour]
# An interceptor's continuation: the next handler for the call's details, or None.
Continuation = Callable[[Any], Any]


class Registration(NamedTuple):
    """One servicer to register: its full service name, the generated add function, itself.

    Attributes:
      service: the full proto service name, e.g. ``"batchlab.v1.CheckpointService"``
        (the name health reports on).
      add_to_server: the generated ``add_<Service>Servicer_to_server``.
      servicer: the servicer instance.
    """

    service: str
    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any

    @classmethod
    def for_service(
        cls, pb2: ModuleType, pb2_grpc: ModuleType, name: str, servicer: Any
    ) -> Registration:
        """Builds a registration from the generated modules and the short service name.

        Args:
          pb2: the generated ``*_pb2`` module (for the full name).
          pb2_grpc: the generated ``*_pb2_grpc`` module (for the add function).
          name: the service name in the .proto, e.g. ``"CheckpointService"``.
          servicer: the servicer instance.
        """
        full_name = pb2.DESCRIPTOR.services_by_name[name].full_name
        return cls(full_name, getattr(pb2_grpc, f"add_{name}Servicer_to_server"), servicer)


def _split_method(full_method: str) -> tuple[str, str]:
    """Splits ``/pkg.Service/Method`` into ``("pkg.Service", "Method")``."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def _replace_behaviour(handler: grpc.RpcMethodHandler, wrap: Wrap,
                       request_deserializer: Callable[[bytes], Any] | None = None,
                       ) -> grpc.RpcMethodHandler:
    """Returns a handler of the same kind whose behaviour is ``wrap(behaviour, streaming)``.

    ``request_deserializer`` replaces the handler's when given.
    """
    if handler.unary_unary:
        factory, behaviour, streaming = (
            grpc.unary_unary_rpc_method_handler, handler.unary_unary, False)
    elif handler.unary_stream:
        factory, behaviour, streaming = (
            grpc.unary_stream_rpc_method_handler, handler.unary_stream, True)
    elif handler.stream_unary:
        factory, behaviour, streaming = (
            grpc.stream_unary_rpc_method_handler, handler.stream_unary, False)
    else:
        factory, behaviour, streaming = (
            grpc.stream_stream_rpc_method_handler, handler.stream_stream, True)
    return factory(
        wrap(behaviour, streaming),
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` as UNAUTHENTICATED.

    The scheme name is matched without regard to case ("bearer", "BEARER"), as RFC 7235
    (section 2.1) and RFC 6750 ask; the token itself is compared exactly, in constant time.
    Health checks are exempt so that Kubernetes probes need no secret.

    Args:
      token: the shared secret.
    """

    def __init__(self, token: str):
        if not token:
            raise ValueError("token must not be empty")
        self._expected = token.encode()

    def _authorized(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                scheme, _, credentials = given.strip().partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                # Constant time, so the comparison does not leak how much of a guess was right.
                return hmac.compare_digest(credentials.strip(b" "), self._expected)
        return False

    def intercept_service(self, continuation: Continuation,
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """Passes authorized and health calls on; answers others with UNAUTHENTICATED."""
        handler = continuation(handler_call_details)
        service, _ = _split_method(handler_call_details.method)
        if handler is None or service == HEALTH_SERVICE:
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        method = handler_call_details.method

        def deny(behaviour: Behaviour, streaming: bool) -> Behaviour:
            def reject(request_or_iterator: Any, context: Any) -> None:
                logger.info("%s -> UNAUTHENTICATED: missing or wrong bearer token", method)
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid credentials: send metadata 'authorization: Bearer <token>'",
                )

            return reject

        return _replace_behaviour(handler, deny)


class RequestGuardInterceptor(grpc.ServerInterceptor):
    """Turns undecodable or unusable requests into INVALID_ARGUMENT before servicer code runs.

    See :mod:`batchlab.rpc.validation` for what is checked. Without it, gRPC answers a
    request it cannot decode with INTERNAL, and servicers meet unknown enum numbers.
    """

    def intercept_service(self, continuation: Continuation,
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """Wraps the handler's deserializer and checks every request message."""
        from batchlab.rpc import validation

        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def refuse(context: Any, error: InvalidArgument) -> None:
            logger.info("%s -> INVALID_ARGUMENT: %s", method, error.message)
            if error.field_path:
                context.set_trailing_metadata(
                    ((FIELD_PATH_METADATA_KEY, ascii(error.field_path)[1:-1]),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

        def check(request: Any, context: Any) -> None:
            if isinstance(request, validation.Undecodable):
                refuse(context, request.error())
            try:
                validation.check_message(request)
            except InvalidArgument as error:
                refuse(context, error)

        def guard(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if handler.request_streaming:

                def checked_iterator(requests: Iterable[Any], context: Any) -> Iterator[Any]:
                    for request in requests:
                        check(request, context)
                        yield request

                if streaming:

                    def stream_stream(requests: Iterable[Any], context: Any) -> Iterator[Any]:
                        yield from behaviour(checked_iterator(requests, context), context)

                    return stream_stream

                def stream_unary(requests: Iterable[Any], context: Any) -> Any:
                    return behaviour(checked_iterator(requests, context), context)

                return stream_unary
            if streaming:

                def unary_stream(request: Any, context: Any) -> Iterator[Any]:
                    check(request, context)
                    yield from behaviour(request, context)

                return unary_stream

            def unary_unary(request: Any, context: Any) -> Any:
                check(request, context)
                return behaviour(request, context)

            return unary_unary

        return _replace_behaviour(handler, guard,
                                  validation.guarded_deserializer(handler.request_deserializer))


def _client_of(peer: str) -> str:
    """The client's host from a gRPC peer string ("ipv4:127.0.0.1:5123" -> "127.0.0.1")."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0] or address
    return peer


class StreamLimiter:
    """Counts open streaming calls, in total and per client host; refuses past the bounds.

    Args:
      max_total: streaming calls open at once, all clients together.
      max_per_client: streaming calls open at once from one client host.
    """

    def __init__(self, max_total: int, max_per_client: int):
        if max_total < 1 or max_per_client < 1:
            raise ValueError("stream limits must be >= 1; got "
                             f"max_total={max_total}, max_per_client={max_per_client}")
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._lock = threading.Lock()
        self._by_client: dict[str, int] = {}
        self._total = 0

    @property
    def open(self) -> int:
        """Streaming calls open now."""
        return self._total

    def acquire(self, client: str) -> str | None:
        """Takes a slot for ``client``; returns why not (the RESOURCE_EXHAUSTED message) or None."""
        with self._lock:
            mine = self._by_client.get(client, 0)
            if self._total >= self.max_total:
                return (f"the server has {self._total} streaming calls open, its limit; "
                        "close a stream (e.g. a WatchExperiment) or retry later")
            if mine >= self.max_per_client:
                return (f"this client ({client}) has {mine} streaming calls open, the limit "
                        "per client; close one first (e.g. a WatchExperiment)")
            self._by_client[client] = mine + 1
            self._total += 1
            return None

    def release(self, client: str) -> None:
        """Gives ``client``'s slot back."""
        with self._lock:
            self._total -= 1
            left = self._by_client.get(client, 1) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Bounds streaming calls so that they cannot hold every server thread.

    The synchronous gRPC server runs each call on a pool thread for the call's whole life, and
    a WatchExperiment stream lives as long as its experiment. :func:`build_server` sizes the
    pool as the stream bound plus ``max_workers``, so however many streams are open, unary
    calls (GetExperiment, ReportProgress, health checks) always find a free thread; a stream
    past the bound ends at once with RESOURCE_EXHAUSTED saying which bound was hit.

    Why not an asyncio server: every servicer and the SQLite storage are blocking code, so
    grpc.aio would run them on a thread pool anyway, and streams would hold those threads just
    the same; bounding streams keeps one server model and gives a clear error instead.

    Args:
      limiter: the shared counts.
    """

    def __init__(self, limiter: StreamLimiter):
        self._limiter = limiter

    def intercept_service(self, continuation: Continuation,
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """Wraps streaming handlers with a slot taken at start and given back at the end."""
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        limiter = self._limiter
        method = handler_call_details.method

        def slot(context: Any) -> Callable[[], None]:
            client = _client_of(context.peer())
            refusal = limiter.acquire(client)
            if refusal is not None:
                logger.warning("%s -> RESOURCE_EXHAUSTED: %s", method, refusal)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            once = threading.Lock()

            def release() -> None:
                # Runs from the finally below and from gRPC's termination callback: once.
                if once.acquire(blocking=False):
                    limiter.release(client)

            context.add_callback(release)
            return release

        def bounded(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if streaming:

                def stream(request_or_iterator: Any, context: Any) -> Iterator[Any]:
                    release = slot(context)
                    try:
                        yield from behaviour(request_or_iterator, context)
                    finally:
                        release()

                return stream

            def unary(request_or_iterator: Any, context: Any) -> Any:
                release = slot(context)
                try:
                    return behaviour(request_or_iterator, context)
                finally:
                    release()

            return unary

        return _replace_behaviour(handler, bounded)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts calls and observes their latency by service, method and status code.

    Args:
      metrics: the ``Metrics`` from :func:`batchlab.rpc.metrics.make_metrics` (or its
        ``RpcMetrics``); calls are recorded with ``rpc.observe(service, method, code, s)``.
    """

    def __init__(self, metrics: Any):
        self._rpc = getattr(metrics, "rpc", metrics)

    def _record(self, service: str, method: str, code: grpc.StatusCode, start: float) -> None:
        self._rpc.observe(service, method, code, time.perf_counter() - start)

    def intercept_service(self, continuation: Continuation,
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """Wraps the handler so that every call is recorded once, however it ends."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        record = self._record

        def measure(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if streaming:

                def stream(request_or_iterator: Any, context: Any) -> Iterator[Any]:
                    start = time.perf_counter()
                    code = grpc.StatusCode.OK
                    try:
                        yield from behaviour(request_or_iterator, context)
                    except GeneratorExit:
                        code = grpc.StatusCode.CANCELLED
                        raise
                    except BaseException:
                        code = _code_after_error(context)
                        raise
                    finally:
                        if code == grpc.StatusCode.OK:
                            code = _code_of(context)
                        record(service, method, code, start)

                return stream

            def unary(request_or_iterator: Any, context: Any) -> Any:
                start = time.perf_counter()
                try:
                    response = behaviour(request_or_iterator, context)
                except BaseException:
                    record(service, method, _code_after_error(context), start)
                    raise
                record(service, method, _code_of(context), start)
                return response

            return unary

        return _replace_behaviour(handler, measure)


def _code_of(context: Any) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def _code_after_error(context: Any) -> grpc.StatusCode:
    # context.abort sets the code before raising; anything else that escapes is UNKNOWN.
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.UNKNOWN


class Server:
    """A started-or-not gRPC server with its health service; made by :func:`build_server`.

    Attributes:
      port: the bound port (the real one when 0 was asked for).
      host: the bound host.
      service_name: the deployable's name, for logs.
      health: the ``grpc_health`` servicer (statuses by service name).
      services: the full names of the registered services.
      streams: the :class:`StreamLimiter` bounding its streaming calls (None if unbounded).
    """

    streams: StreamLimiter | None = None

    def __init__(self, grpc_server: grpc.Server, health_servicer: health.HealthServicer,
                 *, host: str, port: int, service_name: str, services: tuple[str, ...]):
        self._server = grpc_server
        self.health = health_servicer
        self.host = host
        self.port = port
        self.service_name = service_name
        self.services = services
        self._started = False
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` a client on this machine can dial."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "[::]", "::") else self.host
        return f"{host}:{self.port}"

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._started

    def start(self) -> None:
        """Starts serving and reports every service SERVING."""
        self._server.start()
        self._started = True
        for name in ("", *self.services):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("%s listening on %s:%d (%s)", self.service_name, self.host, self.port,
                    ", ".join(self.services))

    def stop(self, grace: float | None = 5.0) -> None:
        """Reports NOT_SERVING, then stops, letting in-flight calls finish for ``grace`` s.

        New calls are refused at once; calls still running after ``grace`` seconds are
        cancelled. Blocks until the server has stopped; a second call is a no-op.

        Args:
          grace: seconds in-flight calls may take to finish (None: cancel them now).
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self.health.enter_graceful_shutdown()
            logger.info("%s stopping (grace %s s)", self.service_name, grace)
            self._server.stop(grace).wait()
            self._stopped.set()
            logger.info("%s stopped", self.service_name)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops or ``timeout`` passes; True when it stopped.

        Args:
          timeout: seconds to wait; None waits forever.
        """
        timed_out = self._server.wait_for_termination(timeout)
        return not timed_out


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def build_server(
    registrations: Iterable[Registration | tuple[str, Callable[[Any, grpc.Server], None], Any]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    service_name: str = "batchlab",
    auth_token: str | None = None,
    metrics: Any = None,
    max_workers: int = 16,
    max_streams: int = DEFAULT_MAX_STREAMS,
    max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT,
) -> Server:
    """Builds a gRPC server with health, optional auth and optional metrics; not started.

    Every request is checked before servicer code runs (:class:`RequestGuardInterceptor`),
    and streaming calls are bounded (:class:`StreamLimitInterceptor`): the thread pool holds
    ``max_workers + max_streams`` threads, so unary calls keep ``max_workers`` threads
    however many streams are open.

    Args:
      registrations: the servicers to serve (:class:`Registration` or equal tuples).
      host: interface to bind; 127.0.0.1 by default ("0.0.0.0" to be reachable in a pod).
      port: port to bind; 0 picks a free one (see ``Server.port``).
      service_name: the deployable's name, for logs (e.g. "checkpoints").
      auth_token: when set, every call but health checks needs
        ``authorization: Bearer <token>``.
      metrics: the object from ``batchlab.rpc.metrics.make_metrics``; None records nothing.
      max_workers: threads kept for unary calls (a streaming call holds a thread for its
        duration, from the ``max_streams`` more).
      max_streams: streaming calls open at once (RESOURCE_EXHAUSTED past it).
      max_streams_per_client: streaming calls open at once from one client host.

    Returns:
      The :class:`Server`; call ``start()``.

    Raises:
      RuntimeError: if the address cannot be bound.
    """
    entries = [Registration(*r) for r in registrations]
    if not auth_token and host not in _LOOPBACK_HOSTS:
        logger.warning("%s: serving on %s without an auth token (set %s)",
                       service_name, host, AUTH_TOKEN_ENV)
    interceptors: list[grpc.ServerInterceptor] = []
    # Metrics outermost, so that rejected (unauthenticated) calls are counted too.
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics))
    if auth_token:
        interceptors.append(BearerTokenInterceptor(auth_token))
    streams = StreamLimiter(max_streams, max_streams_per_client)
    # Innermost: the request is checked after auth, and only calls given a slot are checked.
    interceptors += [StreamLimitInterceptor(streams), RequestGuardInterceptor()]
    grpc_server = grpc.server(
        # Threads start on demand: an idle server does not hold max_streams of them.
        futures.ThreadPoolExecutor(max_workers=max_workers + max_streams,
                                   thread_name_prefix=f"{service_name}-rpc"),
        interceptors=interceptors,
        # gRPC turns SO_REUSEPORT on by default: a second server on a taken port would then
        # start and share its connections (two controllers on one database). Refuse instead.
        options=[("grpc.so_reuseport", 0)],
    )
    for registration in entries:
        registration.add_to_server(registration.servicer, grpc_server)
    health_servicer = health.HealthServicer()
    # Until start() every service reports NOT_SERVING (the overall "" too).
    names = tuple(r.service for r in entries)
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    address = _bind_address(host, port)
    try:
        bound = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"{service_name}: cannot bind {address}: {exc}") from exc
    if not bound:
        raise RuntimeError(f"{service_name}: cannot bind {address}")
    server = Server(grpc_server, health_servicer, host=host, port=bound,
                    service_name=service_name, services=names)
    server.streams = streams
    return server


def serve(server: Server, *, grace: float = 10.0,
          signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Starts ``server`` (if needed) and runs until SIGTERM or SIGINT, then stops gracefully.

    On a signal, health turns NOT_SERVING (so probes and load balancers stop sending new
    work), new calls are refused and in-flight calls get ``grace`` seconds to finish.
    Must be called from the main thread (signal handlers can only be installed there).

    Args:
      server: from :func:`build_server`.
      grace: seconds in-flight calls may take after the signal.
      signals: the signals that stop the server.

    Returns:
      0, the process exit status for a clean stop.
    """
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        logger.info("%s received %s", server.service_name, signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in signals}
    try:
        if not server.started:
            server.start()
        # Short waits so the main thread returns to the interpreter to run the handler.
        while not stop_requested.wait(0.5):
            pass
        server.stop(grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What a service's ``server.py`` reads from the environment.

    Attributes:
      host: interface to bind (``BATCHLAB_BIND_HOST``; 0.0.0.0 when unset, so that the
        container is reachable; set 127.0.0.1 to keep a local server private).
      port: gRPC port (``BATCHLAB_<NAME>_PORT``).
      metrics_port: Prometheus HTTP port (``BATCHLAB_METRICS_PORT``; 0 picks a free one).
      auth_token: bearer token (``BATCHLAB_AUTH_TOKEN``), None when unset or empty.
      grace: shutdown grace in seconds (``BATCHLAB_SHUTDOWN_GRACE_SECONDS``, default 10).
    """

    host: str
    port: int
    metrics_port: int
    auth_token: str | None
    grace: float


def env_port(name: str, default: int, environ: Mapping[str, str]) -> int:
    """The port number in variable ``name`` (0-65535), ``default`` when it is unset or empty.

    Raises:
      ValueError: naming the variable, when its value is not a port number.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{name} must be a port number (0-65535); got {raw!r}")
    return int(raw)


def settings_from_env(name: str, *, default_port: int, default_metrics_port: int | None = None,
                      default_host: str = DEFAULT_BIND_HOST,
                      environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Reads a service's server settings from the environment.

    Args:
      name: the service's role, e.g. "checkpoints" (reads ``BATCHLAB_CHECKPOINTS_PORT``).
      default_port: gRPC port when the variable is unset.
      default_metrics_port: metrics port when ``BATCHLAB_METRICS_PORT`` is unset; defaults
        to the role's port in ``batchlab.rpc.metrics.METRICS_PORTS``.
      default_host: interface to bind when ``BATCHLAB_BIND_HOST`` is unset.
      environ: mapping to read (``os.environ`` by default).

    Returns:
      The settings.

    Raises:
      ValueError: naming the variable whose value is malformed.
    """
    environ = os.environ if environ is None else environ
    if default_metrics_port is None:
        from batchlab.rpc.metrics import METRICS_PORTS

        default_metrics_port = METRICS_PORTS[name]
    port_env = f"BATCHLAB_{name.upper().replace('-', '_')}_PORT"
    raw_grace = environ.get(SHUTDOWN_GRACE_ENV, "").strip()
    try:
        grace = float(raw_grace) if raw_grace else 10.0
    except ValueError:
        raise ValueError(f"{SHUTDOWN_GRACE_ENV} must be a number of seconds; "
                         f"got {raw_grace!r}") from None
    if not grace >= 0:
        raise ValueError(f"{SHUTDOWN_GRACE_ENV} must be >= 0; got {raw_grace!r}")
    return ServerSettings(
        host=environ.get(BIND_HOST_ENV, "").strip() or default_host,
        port=env_port(port_env, default_port, environ),
        metrics_port=env_port(METRICS_PORT_ENV, default_metrics_port, environ),
        auth_token=environ.get(AUTH_TOKEN_ENV) or None,
        grace=grace,
    )


LOG_LEVEL_ENV = "BATCHLAB_LOG_LEVEL"
_NOISY_LOGGERS = ("absl", "orbax", "jax", "etils", "tensorflow_datasets")


def configure_logging(environ: Mapping[str, str] | None = None) -> None:
    """Sets up process logging for a service main (level from ``BATCHLAB_LOG_LEVEL``, INFO).

    Args:
      environ: mapping to read (``os.environ`` by default).
    """
    environ = os.environ if environ is None else environ
    level = environ.get(LOG_LEVEL_ENV, "INFO").upper()
    level = level if level in logging.getLevelNamesMapping() else "INFO"
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s",
    )
    # Orbax (through absl), JAX and tfds log every save, restore and compile at INFO: a dozen
    # lines per evaluation that bury the service's own. They speak at DEBUG level only.
    number = logging.getLevelNamesMapping()[level]
    if number > logging.DEBUG:
        for noisy in _NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(max(logging.WARNING, number))


def run_service(
    name: str,
    *,
    default_port: int,
    make_registrations: Callable[[Any], Iterable[Registration]],
    environ: Mapping[str, str] | None = None,
    preload: Sequence[str] = (),
    prepare: Callable[[Mapping[str, str] | None], Any] | None = None,
) -> int:
    """The whole main of a service: settings, metrics endpoint, server, serve until a signal.

    Args:
      name: the service's role ("checkpoints", "sharding", ...): names the port variable
        ``BATCHLAB_<NAME>_PORT``, the metrics role and the logs.
      default_port: gRPC port when ``BATCHLAB_<NAME>_PORT`` is unset.
      make_registrations: called with the process's ``Metrics`` (role ``name``); returns the
        servicers to serve. A ``StartupError`` (or other RuntimeError), ``ValueError`` or
        ``OSError`` raised here (a missing or bad setting) ends the process with status 2
        and one clear log line.
      environ: mapping to read (``os.environ`` by default).
      preload: modules the handlers import on first use that must be imported before the
        server serves: tensorflow_datasets (batchlab.data.builders) imports its dependencies
        inside ``etils.epy.lazy_imports()``, which swaps the process-wide ``__import__`` while
        it runs, and gRPC's server imports a name on every call; an RPC arriving on another
        thread meanwhile failed in gRPC itself ("'LazyModule' object is not callable") and was
        never answered, so its caller waited out its deadline (seen in the evaluator: a
        30-minute hang of a 16-run benchmark).
      prepare: called with ``environ`` once logging is set up, before the preload (the
        evaluator lowers its CPU priority there, so that its imports yield to the
        controller's start); errors as for ``make_registrations``.

    Returns:
      The process exit status: 0 after a signalled stop, 2 for a configuration error.
    """
    import importlib

    from batchlab.rpc.metrics import make_metrics, start_metrics_server

    configure_logging(environ)
    try:
        if prepare is not None:
            prepare(environ)
    except (RuntimeError, ValueError, OSError) as exc:
        logger.error("%s cannot start: %s", name, exc)
        return EXIT_CONFIGURATION
    for module in preload:
        importlib.import_module(module)
    try:
        settings = settings_from_env(name, default_port=default_port, environ=environ)
        metrics = make_metrics(roles=[name])
        registrations = list(make_registrations(metrics))
        server = build_server(registrations, host=settings.host, port=settings.port,
                              service_name=name, auth_token=settings.auth_token,
                              metrics=metrics)
    except (RuntimeError, ValueError, OSError) as exc:  # StartupError is a RuntimeError.
        logger.error("%s cannot start: %s", name, exc)
        return EXIT_CONFIGURATION
    try:
        metrics_server = start_metrics_server(settings.metrics_port, metrics.registry,
                                              addr=settings.host)
    except OSError as exc:
        logger.error("%s cannot start: metrics port %s:%d (%s): %s", name, settings.host,
                     settings.metrics_port, METRICS_PORT_ENV, exc)
        server.stop(None)
        return EXIT_CONFIGURATION
    logger.info("%s metrics on %s:%d", name, settings.host, metrics_server.port)
    try:
        return serve(server, grace=settings.grace)
    finally:
        metrics_server.close()
