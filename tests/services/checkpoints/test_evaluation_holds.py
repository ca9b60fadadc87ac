"""Checkpoints held for evaluation: kept by retention until the evaluation is recorded, and the
best checkpoint chosen by the evaluated metric (every store, and through the service)."""

from __future__ import annotations

import grpc
import pytest
from checkpoint_helpers import TRIAL, blob, sha

from batchlab.rpc.errors import InvalidArgument, NotFound


def _save(store, step, *, hold=False):
    content = blob(1000, seed=step)
    return store.save(TRIAL, step, [content], sha256=sha(content), size_bytes=len(content),
                      hold=hold)


def test_held_checkpoints_survive_retention_until_their_evaluation_is_recorded(make_store):
    store = make_store(keep_latest=1).store
    for step in (10, 20, 30):
        assert _save(store, step, hold=True).held
    assert [(r.step, r.held) for r in store.list(TRIAL)] == [(10, True), (20, True), (30, True)]

    record = store.record_evaluation(TRIAL, 10, metric=0.4, maximize=True)
    assert (record.held, record.metric, record.is_best) == (False, 0.4, True)
    store.record_evaluation(TRIAL, 20, metric=0.6, maximize=True)
    # 10 is neither the latest nor the best any more: retention deletes it.
    assert [r.step for r in store.list(TRIAL)] == [20, 30]
    record = store.record_evaluation(TRIAL, 30, metric=0.5, maximize=True)
    assert not record.is_best and record.is_latest
    kept = {r.step: r for r in store.list(TRIAL)}
    assert sorted(kept) == [20, 30] and kept[20].is_best
    # A later unheld save applies retention as before: the evaluated best stays.
    _save(store, 40)
    assert [r.step for r in store.list(TRIAL)] == [20, 40]


def test_recording_without_a_metric_only_releases_and_bad_calls_are_refused(make_store):
    store = make_store().store
    _save(store, 10, hold=True)
    _save(store, 20, hold=True)
    store.record_evaluation(TRIAL, 10)
    assert [r.step for r in store.list(TRIAL)] == [20]
    with pytest.raises(NotFound):
        store.record_evaluation(TRIAL, 15, metric=0.1)
    with pytest.raises(InvalidArgument) as info:
        store.record_evaluation(TRIAL, 20, metric=float("nan"))
    assert info.value.field_path == "metric"


def test_the_service_holds_and_records(running, tmp_path):
    from batchlab.rpc.checkpoint_client import CheckpointClient

    client = CheckpointClient(running.channel)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state").write_bytes(b"x" * 100)
    assert client.save_dir(TRIAL, 10, folder, hold_for_evaluation=True).held_for_evaluation
    client.save_dir(TRIAL, 20, folder)
    assert [c.step for c in client.list(TRIAL)] == [10, 20]
    info = client.record_evaluation(TRIAL, 10, metric=0.9, maximize=True)
    assert info.is_best and not info.held_for_evaluation
    with pytest.raises(grpc.RpcError) as error:
        client.record_evaluation(TRIAL, 99, metric=0.9)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
