"""Print the entries of a hashed lock file (uv/pip-compile format) for the named packages.

The image builds install a few build tools (grpcio-tools to generate the gRPC code, setuptools
to build the batchlab wheel) into a throwaway environment. They are pinned with hashes in
requirements/all.lock; this copies their entries out, so that pip installs them with
--require-hashes like everything else instead of fetching whatever the index serves.

Usage:
    python3 scripts/lock_subset.py requirements/all.lock grpcio-tools protobuf > tools.lock

Exits with status 1, naming them, when a package is not in the lock. Standard library only:
it runs on the bare base image before any environment exists.
"""

from __future__ import annotations

import re
import sys

_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def normalize(name: str) -> str:
    """PEP 503 normalisation: case-insensitive, runs of -_. are one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(lock_text: str) -> dict[str, str]:
    """Map each normalised package name to its entry (the pin line and its hash lines)."""
    found: dict[str, str] = {}
    current: list[str] | None = None
    for line in lock_text.splitlines():
        match = _ENTRY.match(line)
        if match:
            current = [line]
            found[normalize(match.group(1))] = current  # type: ignore[assignment]
        elif current is not None and line.startswith("    --hash="):
            current.append(line)
        else:
            current = None
    return {name: "\n".join(lines) for name, lines in found.items()}  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as handle:
        available = entries(handle.read())
    wanted = [normalize(name) for name in argv[2:]]
    missing = [name for name in wanted if name not in available]
    if missing:
        print(f"lock_subset: not in {argv[1]}: {', '.join(missing)}", file=sys.stderr)
        return 1
    for name in wanted:
        entry = available[name]
        # The last hash line of an entry ends with a continuation backslash in some writers.
        print(entry.rstrip(" \\"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
