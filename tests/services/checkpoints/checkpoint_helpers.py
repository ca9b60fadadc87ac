"""Shared test data for the checkpoint service tests."""

from __future__ import annotations

import hashlib

TRIAL = "experiments/e1/studies/s1/trials/3-r0"
TOKEN = "test-token"


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random content of ``size`` bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def sha(content: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(content).hexdigest()
