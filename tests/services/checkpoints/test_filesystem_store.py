"""What only the filesystem store has to get right: links, temp files, metadata on disk."""

from __future__ import annotations

import pytest
from checkpoint_helpers import TRIAL, blob, sha

from batchlab.rpc.errors import InvalidArgument
from services.checkpoints.storage import CHECKPOINT_DIR, FilesystemCheckpointStore


def _save(store, step, trial=TRIAL, content=None):
    content = blob(1000, seed=step) if content is None else content
    return store.save(trial, step, [content], sha256=sha(content), size_bytes=len(content))


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_is_readable(tmp_path):
    store = FilesystemCheckpointStore(tmp_path)
    record = _save(store, 7)
    folder = f"{TRIAL}/{CHECKPOINT_DIR}"
    assert _files(tmp_path) == [f"{folder}/{7:020d}-{record.sha256[:16]}.bin",
                                f"{folder}/{7:020d}.json"]


def test_a_linked_folder_cannot_lead_outside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "experiments").symlink_to(outside)
    store = FilesystemCheckpointStore(root)
    with pytest.raises(InvalidArgument) as info:
        _save(store, 1)
    assert info.value.field_path == "trial"
    assert list(outside.iterdir()) == []


def test_a_failed_upload_leaves_no_files(tmp_path):
    store = FilesystemCheckpointStore(tmp_path)
    _save(store, 1)
    before = _files(tmp_path)

    def broken_stream():
        yield b"x" * 100
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.save(TRIAL, 2, broken_stream(), sha256=sha(b"x" * 200), size_bytes=200)
    content = blob(500)
    with pytest.raises(InvalidArgument):
        store.save(TRIAL, 2, [content], sha256=sha(content), size_bytes=400)
    assert _files(tmp_path) == before


def test_stale_temp_files_are_removed_at_start(tmp_path):
    store = FilesystemCheckpointStore(tmp_path)
    _save(store, 1)
    stale = tmp_path / TRIAL / CHECKPOINT_DIR / ".tmp-deadbeef"
    stale.write_bytes(b"half an upload")
    FilesystemCheckpointStore(tmp_path)
    assert not stale.exists()
    assert [r.step for r in store.list(TRIAL)] == [1]


def test_unreadable_metadata_hides_the_checkpoint(tmp_path):
    store = FilesystemCheckpointStore(tmp_path, keep_latest=2)
    _save(store, 1)
    _save(store, 2)
    (tmp_path / TRIAL / CHECKPOINT_DIR / f"{2:020d}.json").write_text("{not json")
    assert [r.step for r in store.list(TRIAL)] == [1]
    with store.open(TRIAL) as opened:
        assert opened.record.step == 1


def test_missing_content_falls_back(tmp_path):
    store = FilesystemCheckpointStore(tmp_path, keep_latest=2)
    _save(store, 1)
    record = _save(store, 2)
    (tmp_path / TRIAL / CHECKPOINT_DIR / f"{2:020d}-{record.sha256[:16]}.bin").unlink()
    with store.open(TRIAL) as opened:
        assert (opened.record.step, opened.fallback_from) == (1, 2)


def test_delete_removes_the_trial_folders(tmp_path):
    store = FilesystemCheckpointStore(tmp_path)
    _save(store, 1)
    _save(store, 1, trial="experiments/e1/studies/s2/trials/1-r0")
    store.delete(TRIAL)
    assert not (tmp_path / TRIAL).exists()
    assert (tmp_path / "experiments" / "e1" / "studies" / "s2").is_dir()


def test_a_second_store_on_the_same_root_sees_the_checkpoints(tmp_path):
    _save(FilesystemCheckpointStore(tmp_path), 3, content=b"persisted")
    with FilesystemCheckpointStore(tmp_path).open(TRIAL) as opened:
        assert b"".join(opened.chunks()) == b"persisted"


def test_a_failed_first_upload_leaves_no_folders(tmp_path):
    store = FilesystemCheckpointStore(tmp_path)
    with pytest.raises(InvalidArgument):
        store.save(TRIAL, 1, [b"abc"], sha256=sha(b"abc"), size_bytes=4)
    assert list(tmp_path.iterdir()) == []
