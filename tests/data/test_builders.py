"""Offline builders: build, read back through tfds data sources, cache, rebuild, determinism."""

from __future__ import annotations

import pathlib
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from batchlab import data
from batchlab.data import mlm_corpus, tokenizer


def read_all(source):
    return [source[i] for i in range(len(source))]


def test_digits_content_matches_sklearn(data_dir):
    from sklearn.datasets import load_digits

    train = data.get_dataset("digits", "train", data_dir)
    validation = data.get_dataset("digits", "validation", data_dir)
    assert (len(train), len(validation)) == (1438, 359)
    example = train[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.float32
    images = np.stack([train[i]["image"] for i in range(len(train))])
    assert images.min() == 0.0 and images.max() == 1.0
    # The split is a fixed permutation (legacy RandomState(0)); each split keeps source order.
    digits = load_digits()
    order = np.random.RandomState(0).permutation(1797)
    train_indices = np.sort(order[359:])
    np.testing.assert_array_equal(images[:, :, :, 0], digits.images[train_indices] / 16.0)
    labels = [train[i]["label"] for i in range(len(train))]
    assert labels == digits.target[train_indices].tolist()


def test_mnist1d_small_matches_the_generator_and_leaves_global_rng_alone(tmp_path):
    import mnist1d.data

    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    builder = data.prepare("mnist1d", tmp_path, num_samples=200)
    assert np.random.random() == expected  # mnist1d seeds numpy's global RNG; restored.
    assert pathlib.Path(builder.data_dir).parts[-3:] == ("mnist1d", "num_samples200", "1.0.0")

    args = mnist1d.data.get_dataset_args()
    args.num_samples = 200
    reference = mnist1d.data.make_dataset(args)
    train = builder.as_data_source("train")
    validation = builder.as_data_source("validation")
    assert (len(train), len(validation)) == (160, 40)
    xs = np.stack([train[i]["x"] for i in range(len(train))])
    assert xs.dtype == np.float32 and xs.shape == (160, 40)
    np.testing.assert_array_equal(xs, reference["x"].astype(np.float32))
    assert [validation[i]["label"] for i in range(40)] == reference["y_test"].tolist()


def test_mnist1d_small_config_sizes(data_dir):
    train = data.get_dataset("mnist1d", "train", data_dir, config="small")
    assert len(train) == 1600
    assert len(data.get_dataset("mnist1d", "validation", data_dir, config="small")) == 400
    assert 0 <= train[0]["label"] < 10


def test_prepare_twice_is_a_no_op_and_rebuild_regenerates(tmp_path):
    builder = data.prepare("digits", tmp_path)
    info_file = pathlib.Path(builder.data_dir) / "dataset_info.json"
    records = sorted(pathlib.Path(builder.data_dir).glob("*.array_record*"))
    assert records
    stamp = records[0].stat().st_mtime_ns
    files = {p: p.stat().st_mtime_ns for p in pathlib.Path(builder.data_dir).rglob("*")}

    again = data.prepare("digits", tmp_path)
    # A no-op: nothing written, nothing rewritten (not a wall-clock bound).
    assert {p: p.stat().st_mtime_ns for p in pathlib.Path(builder.data_dir).rglob("*")} == files
    assert records[0].stat().st_mtime_ns == stamp
    assert again.data_dir == builder.data_dir

    before = read_all(again.as_data_source("validation"))
    time.sleep(0.01)
    rebuilt = data.prepare("digits", tmp_path, rebuild=True)
    records_after = sorted(pathlib.Path(rebuilt.data_dir).glob("*.array_record*"))
    assert records_after[0].stat().st_mtime_ns != stamp
    assert info_file.exists()
    after = read_all(rebuilt.as_data_source("validation"))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_builds_are_identical_across_folders(tmp_path, data_dir):
    """Same config, fresh folder: byte-identical record files (deterministic content)."""
    fresh = data.prepare("mlm_corpus", tmp_path, config="small")
    cached = data.builder("mlm_corpus", data_dir, config="small")
    for name in ("mlm_corpus-train.array_record-00000-of-00001", tokenizer.VOCAB_FILENAME):
        assert (pathlib.Path(fresh.data_dir) / name).read_bytes() == (
            pathlib.Path(cached.data_dir) / name
        ).read_bytes()


def test_tfds_data_source_reads_the_built_dataset(data_dir):
    source = tfds.data_source("digits", split="train", data_dir=str(data_dir), download=False)
    assert len(source) == 1438
    assert source[3]["image"].shape == (8, 8, 1)


def test_mlm_corpus_documents_and_vocabulary(data_dir):
    builder = data.builder("mlm_corpus", data_dir, config="small")
    vocab_file = pathlib.Path(builder.data_dir) / "vocab.txt"
    assert vocab_file.exists()
    tok = data.mlm_tokenizer(data_dir, config="small")
    assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab_size <= 1024
    assert builder.info.metadata["vocab_size"] == tok.vocab_size
    assert builder.info.metadata["python_version"].startswith("3.")
    for split in ("train", "validation"):
        source = data.get_dataset("mlm_corpus", split, data_dir, config="small")
        assert len(source) > 0
        for example in read_all(source):
            ids, lengths = example["token_ids"], example["sentence_lengths"]
            assert ids.dtype == np.int32 and lengths.dtype == np.int32
            assert lengths.sum() == len(ids) and (lengths > 0).all()
            assert ids.min() >= tokenizer.UNK_ID and ids.max() < tok.vocab_size
            assert not np.isin(ids, [0, 2, 3, 4]).any()  # No PAD/CLS/SEP/MASK in the text.
            path = example["path"].decode()
            assert mlm_corpus.is_validation(path, 0.1) == (split == "validation")
    first = data.get_dataset("mlm_corpus", "train", data_dir, config="small")[0]
    sentences = mlm_corpus.document_sentences(first)
    assert tok.decode(sentences[0])  # Decodes to text.


def test_split_sentences():
    text = "First sentence. Second one!\nstill second? Third.\n\n>>> x = 1\n>>> x\n1"
    assert mlm_corpus.split_sentences(text) == [
        "First sentence.",
        "Second one! still second?",
        "Third.",
        ">>> x = 1",
        ">>> x",
        "1",
    ]


def test_errors_name_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match=r"one of \['digits', 'imagenet2012', 'mlm_corpus'"):
        data.get_dataset("cifar10", "train", tmp_path)
    with pytest.raises(
        ValueError, match=r"name must be one of \['digits', 'mlm_corpus', 'mnist1d'\]"
    ):
        data.prepare("imagenet", tmp_path)
    with pytest.raises(
        ValueError, match=r"config of mnist1d must be one of \['default', 'small'\]"
    ):
        data.prepare("mnist1d", tmp_path, config="tiny")
    with pytest.raises(ValueError, match=r"unknown mnist1d config fields \['samples'\]"):
        data.prepare("mnist1d", tmp_path, samples=10)
    with pytest.raises(FileNotFoundError, match="call prepare"):
        data.get_dataset("digits", "train", tmp_path, build=False)
    with pytest.raises(ValueError, match="unknown keyword arguments"):
        data.get_dataset("digits", "train", tmp_path, decode=True)


def test_unknown_split(data_dir):
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'validation'\]"):
        data.get_dataset("digits", "test", data_dir)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHLAB_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path / "tfds"
    monkeypatch.delenv("BATCHLAB_DATA_DIR")
    assert data.default_data_dir() == pathlib.Path.home() / ".cache" / "batchlab" / "tfds"


def test_tfds_temporary_folders_stay_in_the_test_tmpdir(private_tmpdir, data_dir):
    import tempfile

    assert tempfile.gettempdir() == str(private_tmpdir)
