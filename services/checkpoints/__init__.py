"""Checkpoint storage service: streamed uploads, hash-verified reads, retention per trial."""
