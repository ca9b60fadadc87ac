"""Client side of the services: channels with a bearer token, peer addresses, readiness.

Services reach each other only through stubs on these channels, with the peer's address from
``BATCHLAB_<PEER>_ADDR``.

Example:
  >>> from batchlab.proto.v1 import sharding_pb2_grpc
  >>> ch = channel(peer_address("sharding"), token=os.environ.get("BATCHLAB_AUTH_TOKEN"))  # doctest: +SKIP
  >>> wait_for_ready(ch, timeout=30)  # doctest: +SKIP
  >>> stub = sharding_pb2_grpc.ShardingServiceStub(ch)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The process cannot start: a required setting is missing or malformed."""


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call.

    gRPC refuses call credentials on an insecure channel, and in-cluster traffic here is
    plaintext, so the token travels as plain metadata added by this interceptor.
    """

    def __init__(self, token: str):
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._pair]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Unary call with the token added."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Server-streaming call with the token added."""
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        """Client-streaming call with the token added."""
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        """Bidirectional call with the token added."""
        return continuation(self._details(client_call_details), request_iterator)


def channel(
    address: str,
    *,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """Opens a plaintext channel that sends a bearer token with every call.

    For loopback and in-cluster traffic (plaintext); close it with ``channel.close()``.

    Args:
      address: ``host:port``.
      token: the shared token (``BATCHLAB_AUTH_TOKEN``); None or "" sends none.
      options: extra gRPC channel options.

    Returns:
      The channel.
    """
    if not address:
        raise ValueError("address must be host:port; got an empty string")
    base = grpc.insecure_channel(address, options=list(options))
    if not token:
        return base
    return grpc.intercept_channel(base, _BearerToken(token))


def peer_env_var(peer: str) -> str:
    """Returns the environment variable holding a peer's address, e.g. BATCHLAB_SHARDING_ADDR.

    Args:
      peer: the peer service's name ("sharding", "checkpoints", "controller", ...).
    """
    return f"BATCHLAB_{peer.upper().replace('-', '_')}_ADDR"


def peer_address(peer: str, *, environ: Mapping[str, str] | None = None) -> str:
    """Returns the ``host:port`` of a peer service from ``BATCHLAB_<PEER>_ADDR``.

    Args:
      peer: the peer service's name, e.g. "checkpoints".
      environ: mapping to read (``os.environ`` by default).

    Returns:
      The address.

    Raises:
      StartupError: when the variable is missing, empty or not ``host:port``, naming it.
    """
    environ = os.environ if environ is None else environ
    name = peer_env_var(peer)
    value = environ.get(name, "").strip()
    if not value:
        raise StartupError(
            f"{name} is not set: it must hold the address (host:port) of the {peer} service"
        )
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise StartupError(f"{name} must be host:port; got {value!r}")
    return value


def wait_for_ready(channel: grpc.Channel, timeout: float, *, service: str = "") -> None:
    """Blocks until the server's health check reports ``service`` SERVING.

    Args:
      channel: channel to the server.
      timeout: seconds to wait in all.
      service: the service name to check ("" = the whole server).

    Raises:
      TimeoutError: if it is not SERVING within ``timeout``, saying what was last seen.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"server not SERVING after {timeout} s ({last})")
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=remaining,
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"server not SERVING after {timeout} s ({last})") from exc
            last = f"{exc.code().name}: {exc.details()}"
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


# Ray's default worker ports (--min-worker-port/--max-worker-port) end at 19999.
_PROBE_FLOOR = 20000
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to bind(0); probes stay below it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """Ports free on ``host`` right now, all different, none handed out before by this process.

    For tests, benchmarks and coordinators that need a port before a server binds it. The ports
    are drawn between Ray's worker-port range and the kernel's ephemeral range: every process
    that binds port 0 (Ray's raylets and workers, gRPC clients, other servers) gets a port from
    the ephemeral range, so it cannot take one of these in the window between this probe and
    the server's bind, as it could when the probe itself asked for port 0.

    Args:
      count: how many ports.
      host: the interface to probe.
    """
    import random

    rng = random.SystemRandom()
    ceiling = _ephemeral_floor()
    if ceiling - _PROBE_FLOOR < 100:
        ceiling = 65536
    chosen: list[int] = []
    for _ in range(200 * count):
        if len(chosen) == count:
            break
        port = rng.randrange(_PROBE_FLOOR, ceiling)
        if port in _handed_out or port in chosen:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) < count:
        raise OSError(f"free_ports: found only {len(chosen)} of {count} free ports on {host}")
    _handed_out.update(chosen)
    return chosen
