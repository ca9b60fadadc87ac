"""Packing checkpoint folders, unpacking them safely, checking what arrives (no server)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import grpc
import pytest

from batchlab.proto.v1 import checkpoints_pb2
from batchlab.rpc.checkpoint_client import (
    CheckpointClient,
    UnsafeArchiveError,
    pack_dir,
    unpack_dir,
)


def _tree(root):
    """A small orbax-like folder: nested arrays, metadata, an empty folder, an executable."""
    (root / "state" / "params.zarr").mkdir(parents=True)
    (root / "state" / "params.zarr" / "0.0").write_bytes(os.urandom(3000))
    (root / "state" / "_METADATA").write_text('{"step": 7}')
    (root / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    return root


def _files(root):
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_round_trip_keeps_files_folders_and_exec_bit(tmp_path):
    source = _tree(tmp_path / "src")
    archive = io.BytesIO()
    pack_dir(source, archive)
    archive.seek(0)
    target = tmp_path / "dst"
    target.mkdir()
    unpack_dir(archive, target)
    assert _files(target) == _files(source)
    assert os.access(target / "run.sh", os.X_OK)
    assert not os.access(target / "state" / "_METADATA", os.X_OK)


def test_packing_is_deterministic(tmp_path):
    source = _tree(tmp_path / "src")
    first, second = io.BytesIO(), io.BytesIO()
    pack_dir(source, first)
    os.utime(source / "run.sh", (1, 1))
    pack_dir(source, second)
    assert first.getvalue() == second.getvalue()


def test_packing_refuses_links(tmp_path):
    source = _tree(tmp_path / "src")
    (source / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="link"):
        pack_dir(source, io.BytesIO())


def _malicious(kind):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo()
        if kind == "absolute":
            info.name = "/tmp/evil"
        elif kind == "dotdot":
            info.name = "a/../../evil"
        elif kind == "symlink":
            info.name, info.type, info.linkname = "evil", tarfile.SYMTYPE, "/etc"
        elif kind == "hardlink":
            info.name, info.type, info.linkname = "evil", tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "fifo":
            info.name, info.type = "evil", tarfile.FIFOTYPE
        tar.addfile(info, io.BytesIO(b"") if info.type == tarfile.REGTYPE else None)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "fifo"])
def test_unpack_refuses_entries_that_could_escape(tmp_path, kind):
    target = tmp_path / "dst"
    target.mkdir()
    with pytest.raises(UnsafeArchiveError):
        unpack_dir(_malicious(kind), target)
    assert not (tmp_path / "evil").exists()
    assert not any(target.rglob("evil"))


class _TamperingStub:
    """Serves a checkpoint whose bytes were altered in transit."""

    def __init__(self, content):
        self._content = content

    def LoadCheckpoint(self, request, timeout=None):
        info = checkpoints_pb2.CheckpointInfo(
            trial=request.trial, step=1, size_bytes=len(self._content),
            sha256=hashlib.sha256(self._content).hexdigest())
        yield checkpoints_pb2.LoadCheckpointResponse(info=info)
        yield checkpoints_pb2.LoadCheckpointResponse(data=b"X" + self._content[1:])


def test_load_dir_checks_the_hash_of_what_arrived(tmp_path):
    archive = io.BytesIO()
    pack_dir(_tree(tmp_path / "src"), archive)
    checkpoints = CheckpointClient(grpc.insecure_channel("127.0.0.1:1"))
    checkpoints._stub = _TamperingStub(archive.getvalue())
    with pytest.raises(grpc.RpcError) as info:
        checkpoints.load_dir("experiments/e/trials/1", tmp_path / "dst")
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert not (tmp_path / "dst").exists()
