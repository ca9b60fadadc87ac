"""The contract every CheckpointStore follows, run against each implementation."""

from __future__ import annotations

import threading

import pytest
from checkpoint_helpers import TRIAL, blob, sha

from batchlab.rpc.errors import DataLoss, InvalidArgument, NotFound


def _save(store, step, content=None, *, trial=TRIAL, metric=None, maximize=True, chunk=1000):
    content = blob(2500, seed=step) if content is None else content
    chunks = [content[i:i + chunk] for i in range(0, len(content), chunk)]
    return store.save(trial, step, chunks, sha256=sha(content), size_bytes=len(content),
                      metric=metric, maximize=maximize)


def _read(store, trial=TRIAL, step=None):
    with store.open(trial, step) as opened:
        return opened.record, opened.fallback_from, b"".join(opened.chunks(777))


def test_round_trip(make_store):
    store = make_store().store
    content = blob(10_000)
    record = _save(store, 5, content, metric=0.5)
    assert (record.step, record.size_bytes, record.sha256, record.metric) == (
        5, 10_000, sha(content), 0.5)
    assert record.is_latest and record.is_best
    got, fallback, data = _read(store)
    assert data == content and fallback is None and got.step == 5


def test_empty_content(make_store):
    store = make_store().store
    _save(store, 0, b"")
    assert _read(store)[2] == b""


# (metrics of steps 1..4, maximize, keep_latest, steps kept, best)
RETENTION = [
    ([None, None, None, None], True, 1, [4], None),
    ([0.9, 0.5, 0.7, 0.6], True, 1, [1, 4], 1),
    ([0.9, 0.5, 0.7, 0.6], False, 1, [2, 4], 2),
    ([0.1, 0.5, 0.7, 0.9], True, 1, [4], 4),
    ([0.9, 0.5, 0.7, 0.6], True, 2, [1, 3, 4], 1),
    ([0.5, 0.5, 0.2, 0.2], True, 1, [2, 4], 2),  # Ties: the later step is best.
]


@pytest.mark.parametrize("metrics, maximize, keep_latest, kept, best", RETENTION)
def test_retention_keeps_latest_and_best(make_store, metrics, maximize, keep_latest, kept, best):
    store = make_store(keep_latest=keep_latest).store
    for step, metric in enumerate(metrics, start=1):
        _save(store, step, metric=metric, maximize=maximize)
    records = store.list(TRIAL)
    assert [r.step for r in records] == kept
    assert [r.step for r in records if r.is_latest] == [4]
    assert [r.step for r in records if r.is_best] == ([] if best is None else [best])
    assert store.count() == len(kept)
    for step in kept:
        assert _read(store, step=step)[2] == blob(2500, seed=step)


def test_saving_a_step_again_replaces_it(make_store):
    store = make_store().store
    _save(store, 3, blob(100, seed=1))
    _save(store, 3, blob(200, seed=2))
    assert [r.size_bytes for r in store.list(TRIAL)] == [200]
    assert _read(store)[2] == blob(200, seed=2)


@pytest.mark.parametrize("size_delta, error, field", [
    (1, InvalidArgument, "size_bytes"),   # Declared more than sent.
    (-1, InvalidArgument, "size_bytes"),  # Sent more than declared.
    (0, DataLoss, "sha256"),              # Right size, wrong hash.
])
def test_mismatched_upload_stores_nothing(make_store, size_delta, error, field):
    store = make_store().store
    _save(store, 1)
    content = blob(3000)
    digest = sha(content) if size_delta else sha(content + b"x")
    with pytest.raises(error) as info:
        store.save(TRIAL, 2, [content], sha256=digest, size_bytes=len(content) + size_delta)
    assert info.value.field_path == field
    assert [r.step for r in store.list(TRIAL)] == [1]
    assert store.count() == 1


@pytest.mark.parametrize("trial", [
    "", "/etc/passwd", "../x", "a/../../b", "a//b", "a/./b", "a/", "a/b c", "a\\b", "a/\x00",
    "a/@checkpoints", "é", "x" * 600,
])
def test_names_that_could_escape_are_invalid(make_store, trial):
    store = make_store().store
    for call in (lambda: _save(store, 1, trial=trial), lambda: store.open(trial),
                 lambda: store.list(trial), lambda: store.delete(trial)):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.field_path == "trial"


@pytest.mark.parametrize("header, field", [
    ({"sha256": "ABC"}, "sha256"),
    ({"step": -1}, "step"),
    ({"metric": float("nan")}, "metric"),
    ({"metric": float("inf")}, "metric"),
])
def test_bad_header_fields_are_named(make_store, header, field):
    store = make_store().store
    content = blob(10)
    kwargs = {"sha256": sha(content), "size_bytes": 10, "metric": None, **header}
    step = kwargs.pop("step", 1)
    with pytest.raises(InvalidArgument) as info:
        store.save(TRIAL, step, [content], **kwargs)
    assert info.value.field_path == field


def test_corrupt_latest_falls_back_to_previous_intact(make_store):
    case = make_store(keep_latest=2)
    _save(case.store, 1)
    _save(case.store, 2)
    case.corrupt(case.store, TRIAL, 2)
    record, fallback, data = _read(case.store)
    assert (record.step, fallback, data) == (1, 2, blob(2500, seed=1))
    assert case.corrupted == [(TRIAL, 2)]
    # Every read verifies: the corrupt one is skipped again, the intact one read again.
    assert _read(case.store, step=2)[:2][1] == 2
    assert case.corrupted == [(TRIAL, 2), (TRIAL, 2)]


def test_none_intact_is_not_found(make_store):
    case = make_store()
    _save(case.store, 1)
    case.corrupt(case.store, TRIAL, 1)
    with pytest.raises(NotFound, match="no intact checkpoint"):
        case.store.open(TRIAL)


def test_missing_trial_or_step_is_not_found(make_store):
    store = make_store().store
    with pytest.raises(NotFound, match="no checkpoints"):
        store.open(TRIAL)
    _save(store, 1)
    with pytest.raises(NotFound, match="step 9"):
        store.open(TRIAL, 9)


def test_delete_counts_and_leaves_other_trials(make_store):
    store = make_store(keep_latest=3).store
    other = TRIAL.replace("3-r0", "4-r0")
    for step in (1, 2):
        _save(store, step)
    _save(store, 1, trial=other)
    assert store.delete(TRIAL) == 2
    assert store.delete(TRIAL) == 0
    assert store.list(TRIAL) == []
    assert [r.step for r in store.list(other)] == [1]


def test_nested_trial_names_do_not_collide(make_store):
    store = make_store().store
    _save(store, 1, trial="experiments/e1")
    _save(store, 2, trial="experiments/e1/studies/s1")
    assert [r.step for r in store.list("experiments/e1")] == [1]
    assert store.delete("experiments/e1") == 1
    assert _read(store, trial="experiments/e1/studies/s1")[0].step == 2


def test_size_counts_content(make_store):
    store = make_store(keep_latest=5).store
    before = store.size_bytes()
    _save(store, 1, blob(5000))
    _save(store, 2, blob(7000))
    assert store.size_bytes() - before >= 12_000
    assert store.count() == 2


def test_concurrent_saves_to_many_trials(make_store):
    store = make_store().store
    errors = []

    def work(i):
        try:
            for step in range(3):
                _save(store, step, trial=f"experiments/e/trials/{i}", metric=float(step))
        except Exception as exc:  # Reported below; a thread cannot fail the test itself.
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count() == 8
    assert all(_read(store, trial=f"experiments/e/trials/{i}")[0].step == 2 for i in range(8))
