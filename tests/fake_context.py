"""A fake ``grpc.ServicerContext`` for calling servicer methods directly in tests (test tooling:
it lives with the tests, not in the library).

Example:
  >>> import grpc
  >>> context = FakeContext()
  >>> try:
  ...     context.abort(grpc.StatusCode.NOT_FOUND, "trials/1 not found")
  ... except Aborted as exc:
  ...     exc.code.name
  'NOT_FOUND'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc


class Aborted(Exception):
    """Raised by :meth:`FakeContext.abort`, like the real context (which raises a bare Exception).

    Attributes:
      code: the status code.
      details: the message.
      trailing_metadata: the trailing metadata set before the abort.
    """

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: Sequence[tuple[str, str]]):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = dict(trailing_metadata)


class FakeContext:
    """Records what a servicer does to its context; ``abort`` raises :class:`Aborted`.

    Args:
      metadata: the invocation metadata the "client" sent.
    """

    def __init__(self, metadata: Sequence[tuple[str, str]] = ()):
        self._metadata = tuple(metadata)
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str], ...] = ()
        self._active = True
        self._callbacks: list[Callable[[], None]] = []

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """Ends the call: records the status and raises :class:`Aborted`."""
        self._code, self._details = code, details
        raise Aborted(code, details, self._trailing)

    def abort_with_status(self, status: Any) -> None:
        """Ends the call with a ``grpc.Status``."""
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        """Sets the status code without ending the call."""
        self._code = code

    def set_details(self, details: str) -> None:
        """Sets the status message."""
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        """The status code set so far (None when none)."""
        return self._code

    def details(self) -> str | None:
        """The status message set so far."""
        return self._details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        """Records trailing metadata."""
        self._trailing = tuple(metadata)

    @property
    def trailing_metadata(self) -> dict[str, str]:
        """The trailing metadata set so far."""
        return dict(self._trailing)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata given at construction."""
        return self._metadata

    def is_active(self) -> bool:
        """False once :meth:`cancel` was called (the client went away)."""
        return self._active

    def cancel(self) -> None:
        """Simulates the client cancelling; runs the registered callbacks."""
        self._active = False
        for callback in self._callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Registers a callback run on :meth:`cancel`."""
        self._callbacks.append(callback)
        return True

    def time_remaining(self) -> float | None:
        """No deadline."""
        return None

    def peer(self) -> str:
        """A loopback peer."""
        return "ipv4:127.0.0.1:0"
