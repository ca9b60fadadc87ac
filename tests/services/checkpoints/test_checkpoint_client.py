"""CheckpointClient against a real server: folders up and down, as a trainer uses it."""

from __future__ import annotations

import os

import pytest
from checkpoint_helpers import TRIAL, blob

from batchlab.rpc.checkpoint_client import CheckpointClient
from services.checkpoints.storage import CHECKPOINT_DIR


def _checkpoint_dir(root, step):
    """An orbax-like folder: several MiB of array data over nested files."""
    (root / "state" / "params.zarr").mkdir(parents=True)
    for i in range(3):
        (root / "state" / "params.zarr" / f"0.{i}").write_bytes(blob(900_000, seed=step * 10 + i))
    (root / "state" / "_METADATA").write_text(f'{{"step": {step}}}')
    (root / "state" / "empty").mkdir()
    (root / "_CHECKPOINT_METADATA").write_text("{}")
    return root


def _tree(root):
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def checkpoints(running):
    # Small spool and chunks so the test also covers spilling to a temp file.
    return CheckpointClient(running.channel, timeout=30, chunk_size=256 * 1024,
                            spool_bytes=1 << 20)


def test_save_dir_load_dir_round_trip(checkpoints, tmp_path):
    source = _checkpoint_dir(tmp_path / "ckpt" / "100", 100)
    info = checkpoints.save_dir(TRIAL, 100, source, metric=0.8)
    assert info.step == 100 and info.is_latest and info.size_bytes > 2_700_000
    target = tmp_path / "restore" / "latest"
    loaded = checkpoints.load_dir(TRIAL, target)
    assert loaded.step == 100 and loaded.sha256 == info.sha256
    assert _tree(target) == _tree(source)
    assert not [p for p in target.parent.iterdir() if p.name != "latest"]


def test_load_dir_picks_latest_or_a_step(checkpoints, tmp_path):
    for step, metric in [(100, 0.9), (200, 0.1)]:
        checkpoints.save_dir(TRIAL, step, _checkpoint_dir(tmp_path / str(step), step),
                             metric=metric)
    assert [c.step for c in checkpoints.list(TRIAL)] == [100, 200]
    assert checkpoints.load_dir(TRIAL, tmp_path / "a").step == 200
    assert checkpoints.load_dir(TRIAL, tmp_path / "b", step=100).step == 100
    assert _tree(tmp_path / "b") == _tree(tmp_path / "100")


def test_load_dir_reports_the_fallback(checkpoints, running, tmp_path):
    for step, metric in [(1, 0.9), (2, 0.1)]:
        checkpoints.save_dir(TRIAL, step, _checkpoint_dir(tmp_path / str(step), step),
                             metric=metric)
    folder = running.store.root / TRIAL / CHECKPOINT_DIR
    (path,) = folder.glob(f"{2:020d}-*.bin")
    os.truncate(path, 100)
    info = checkpoints.load_dir(TRIAL, tmp_path / "restored")
    assert (info.step, info.fallback_from) == (1, 2)
    assert _tree(tmp_path / "restored") == _tree(tmp_path / "1")


def test_load_dir_without_checkpoint_returns_none(checkpoints, tmp_path):
    assert checkpoints.load_dir(TRIAL, tmp_path / "nothing") is None
    assert not (tmp_path / "nothing").exists()


def test_load_dir_refuses_a_non_empty_target(checkpoints, tmp_path):
    checkpoints.save_dir(TRIAL, 1, _checkpoint_dir(tmp_path / "src", 1))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    with pytest.raises(FileExistsError):
        checkpoints.load_dir(TRIAL, tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    assert checkpoints.load_dir(TRIAL, tmp_path / "empty").step == 1


def test_delete(checkpoints, tmp_path):
    checkpoints.save_dir(TRIAL, 1, _checkpoint_dir(tmp_path / "src", 1))
    assert checkpoints.delete(TRIAL) == 1
    assert checkpoints.list(TRIAL) == []
