"""ShardingServicer methods called directly, with a fake catalog and a fake context."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from fake_context import Aborted, FakeContext
from prometheus_client import CollectorRegistry

from batchlab import data
from batchlab.proto.v1 import sharding_pb2 as pb
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY, InvalidArgument
from batchlab.rpc.metrics import make_metrics
from services.sharding.datasets import DatasetCatalog, TfdsCatalog
from services.sharding.servicer import ShardingServicer

Code = grpc.StatusCode
SIZES = {"train": 1000, "validation": 250}


class FakeCatalog(DatasetCatalog):
    """Two datasets; building takes a little while and is counted."""

    data_dir = "/fake/tfds"

    def __init__(self, built=()):
        self.builds = []
        self.built = set(built)
        self.lock = threading.Lock()
        # Cleared by a test, a build waits until the test sets it again.
        self.release = threading.Event()
        self.release.set()

    def names(self):
        return ["digits", "mnist1d"]

    def resolve_config(self, dataset, config):
        configs = {"mnist1d": ["default", "small"], "digits": ["default"]}[dataset]
        if config and config not in configs:
            raise InvalidArgument("config", f"must be one of {configs}; got {config!r}")
        return config or "default"

    def prepare(self, dataset, config, *, rebuild=False):
        assert self.release.wait(30), "the test never released the build"
        with self.lock:
            self.builds.append((dataset, config, rebuild))
            self.built.add((dataset, config))
        return SIZES

    def find(self, dataset, config):
        return SIZES if (dataset, config) in self.built else None


def _prepare_all_at_once(servicer, catalog, requests):
    """Call PrepareDataset with every request at once, each from its own thread, holding the
    catalog's build until every caller has reached the servicer's build lock (counted before
    it waits for the lock), so each one overlaps the build; returns the answers."""
    arrived = threading.Condition()
    count = [0]
    lock_for = servicer._lock_for

    class Counting:
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            with arrived:
                count[0] += 1
                arrived.notify_all()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    servicer._lock_for = lambda key: Counting(lock_for(key))
    results = []

    def call(request):
        results.append(servicer.PrepareDataset(request, FakeContext()))

    catalog.release.clear()
    threads = [threading.Thread(target=call, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    try:
        with arrived:
            n = len(requests)
            assert arrived.wait_for(lambda: count[0] >= n, timeout=30), f"{count[0]} of {n} arrived"
    finally:
        catalog.release.set()
        for t in threads:
            t.join()
    return results


@pytest.fixture
def metrics():
    return make_metrics(CollectorRegistry(), roles=["sharding"])


def _abort(call):
    with pytest.raises(Aborted) as info:
        call()
    return info.value


def test_concurrent_prepares_build_once():
    catalog = FakeCatalog()
    servicer = ShardingServicer(catalog)
    # "" and "default" name the same config: still one build, though all 8 callers overlap it.
    results = _prepare_all_at_once(servicer, catalog, [
        pb.PrepareDatasetRequest(dataset="mnist1d", config="" if i % 2 else "default")
        for i in range(8)])
    assert catalog.builds == [("mnist1d", "default", False)]
    assert len(results) == 8
    assert all(dict(r.split_sizes) == SIZES and r.config == "default" for r in results)
    assert results[0].data_dir == "/fake/tfds"


def test_concurrent_rebuilds_build_once_more():
    catalog = FakeCatalog()
    servicer = ShardingServicer(catalog)
    servicer.PrepareDataset(pb.PrepareDatasetRequest(dataset="digits"), FakeContext())
    # Four rebuilds, all arrived before the first of them finishes: one rebuild serves them.
    results = _prepare_all_at_once(servicer, catalog, [
        pb.PrepareDatasetRequest(dataset="digits", rebuild=True) for _ in range(4)])
    assert len(results) == 4 and all(dict(r.split_sizes) == SIZES for r in results)
    assert catalog.builds == [("digits", "default", False), ("digits", "default", True)]


@pytest.mark.parametrize("request_, code, field, text", [
    (pb.PrepareDatasetRequest(dataset="cifar10"), Code.INVALID_ARGUMENT, "dataset",
     "must be one of ['digits', 'mnist1d']"),
    (pb.PrepareDatasetRequest(dataset="mnist1d", config="huge"), Code.INVALID_ARGUMENT,
     "config", "must be one of ['default', 'small']"),
])
def test_prepare_errors(request_, code, field, text, metrics):
    servicer = ShardingServicer(FakeCatalog(), metrics=metrics.sharding)
    aborted = _abort(lambda: servicer.PrepareDataset(request_, FakeContext()))
    assert (aborted.code, aborted.trailing_metadata[FIELD_PATH_METADATA_KEY]) == (code, field)
    assert text in aborted.details
    label = "unknown" if request_.dataset == "cifar10" else request_.dataset
    assert metrics.registry.get_sample_value(
        "batchlab_sharding_errors_total", {"dataset": label, "reason": "invalid_argument"}) == 1


HUGE = "a" * (1 << 20)


@pytest.mark.parametrize("call, field", [
    (lambda s: s.PrepareDataset(pb.PrepareDatasetRequest(dataset=HUGE), FakeContext()),
     "dataset"),
    (lambda s: s.GetShard(pb.GetShardRequest(dataset=HUGE, split="train", shard_count=1),
                          FakeContext()), "dataset"),
    (lambda s: s.GetShard(pb.GetShardRequest(dataset="digits", split=HUGE, shard_count=1),
                          FakeContext()), "split"),
])
def test_a_huge_bad_value_is_quoted_by_a_short_prefix(call, field):
    servicer = ShardingServicer(FakeCatalog(built=[("digits", "default")]))
    aborted = _abort(lambda: call(servicer))
    assert aborted.trailing_metadata[FIELD_PATH_METADATA_KEY] == field
    assert "got 'aaaa" in aborted.details and "... (1048576 characters)" in aborted.details
    assert len(aborted.details) < 200, len(aborted.details)


@pytest.mark.parametrize("dataset", ["imagenet2012", "digits"])
def test_a_huge_config_is_quoted_by_a_short_prefix(tmp_path, dataset):
    with pytest.raises(InvalidArgument) as info:
        TfdsCatalog(tmp_path).resolve_config(dataset, HUGE)
    assert "... (1048576 characters)" in str(info.value) and len(str(info.value)) < 200


def _shard(**fields):
    defaults = {"dataset": "mnist1d", "split": "train", "shard_index": 0, "shard_count": 4,
                "epoch": 0, "seed": 7, "shuffle": True}
    return pb.GetShardRequest(**{**defaults, **fields})


def test_get_shard_before_prepare_is_a_failed_precondition():
    servicer = ShardingServicer(FakeCatalog())
    aborted = _abort(lambda: servicer.GetShard(_shard(), FakeContext()))
    assert aborted.code == Code.FAILED_PRECONDITION
    assert "PrepareDataset" in aborted.details


def test_get_shard_finds_a_dataset_built_earlier():
    catalog = FakeCatalog(built=[("mnist1d", "default")])
    result = ShardingServicer(catalog).GetShard(_shard(), FakeContext())
    assert len(result.indices) == 250 and catalog.builds == []


@pytest.fixture
def servicer(metrics):
    servicer = ShardingServicer(FakeCatalog(), metrics=metrics.sharding,
                                max_indices_per_response=200)
    servicer.PrepareDataset(pb.PrepareDatasetRequest(dataset="mnist1d"), FakeContext())
    return servicer


def test_get_shard_matches_the_library(servicer, metrics):
    expected = data.shard_indices(1000, 1, 4, epoch=2, seed=7, shuffle=True)
    result = servicer.GetShard(_shard(shard_index=1, epoch=2, max_indices=100), FakeContext())
    assert list(result.indices) == expected[:100].tolist()
    assert (result.next_position, result.examples_per_shard, result.end_of_epoch) == (
        100, 250, False)
    assert metrics.registry.get_sample_value(
        "batchlab_sharding_examples_total", {"dataset": "mnist1d", "split": "train"}) == 100


def test_paging_through_an_epoch_respects_the_cap(servicer):
    position, pieces, done = 0, [], False
    while not done:
        result = servicer.GetShard(_shard(start_position=position), FakeContext())
        assert len(result.indices) <= 200
        pieces.extend(result.indices)
        position, done = result.next_position, result.end_of_epoch
    assert pieces == data.shard_indices(1000, 0, 4, epoch=0, seed=7).tolist()
    last = servicer.GetShard(_shard(start_position=250), FakeContext())
    assert (list(last.indices), last.end_of_epoch) == ([], True)


def test_unshuffled_shards_are_strided(servicer):
    result = servicer.GetShard(_shard(shuffle=False, shard_index=3, max_indices=3), FakeContext())
    assert list(result.indices) == [3, 7, 11]


@pytest.mark.parametrize("fields, code, field", [
    ({"dataset": "imagenet"}, Code.INVALID_ARGUMENT, "dataset"),
    ({"config": "nope"}, Code.INVALID_ARGUMENT, "config"),
    ({"split": "test"}, Code.INVALID_ARGUMENT, "split"),
    ({"shard_count": 0}, Code.INVALID_ARGUMENT, "shard_count"),
    ({"shard_index": 4}, Code.INVALID_ARGUMENT, "shard_index"),
    ({"shard_count": 1001, "shard_index": 0}, Code.INVALID_ARGUMENT, "shard_count"),
    ({"start_position": 251}, Code.INVALID_ARGUMENT, "start_position"),
    ({"dataset": "digits"}, Code.FAILED_PRECONDITION, None),
])
def test_get_shard_errors_name_the_field(servicer, fields, code, field):
    aborted = _abort(lambda: servicer.GetShard(_shard(**fields), FakeContext()))
    assert aborted.code == code
    assert aborted.trailing_metadata.get(FIELD_PATH_METADATA_KEY) == field


def test_the_same_request_gives_the_same_indices(servicer):
    first = servicer.GetShard(_shard(max_indices=5), FakeContext())
    again = servicer.GetShard(_shard(max_indices=5), FakeContext())
    assert list(first.indices) == list(again.indices)
    assert np.unique(list(first.indices)).size == 5
