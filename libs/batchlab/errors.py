"""The validation error family: a bad value named by the dotted path of its field.

Every validator of batchlab raises a :class:`FieldError` (or a subclass) for input it refuses:
the optimizer schema (``ConfigError``), workload hyperparameters (``HyperparameterError``),
experiment specs and search spaces (``SpecError``, which carries every problem found) and the
stored-results reader (``ResultsFileError``, which adds the file). Servers map any of them to
INVALID_ARGUMENT naming ``field_path`` (batchlab.rpc.errors.status_for); command-line tools print
the message, which starts with the path.

Example:
    >>> try:
    ...     raise FieldError("optimizer.weights.momentum", "must be in [0, 1), got 1.5")
    ... except ValueError as error:
    ...     print(error.field_path, "|", error)
    optimizer.weights.momentum | optimizer.weights.momentum: must be in [0, 1), got 1.5
"""

from __future__ import annotations

__all__ = ["FieldError"]


class FieldError(ValueError):
    """An invalid value, with the dotted path of the offending field.

    Args:
      field_path: where the problem is, dotted with ``[index]`` for list items ("" when the
        whole input is at fault).
      reason: what is wrong and what is expected.
    """

    def __init__(self, field_path: str, reason: str):
        super().__init__(f"{field_path}: {reason}" if field_path else reason)
        self.field_path = field_path
        self.reason = reason
