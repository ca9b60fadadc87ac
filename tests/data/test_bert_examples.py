"""BERT pretraining examples: shapes, pair structure, 15% / 80-10-10 masking, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from batchlab import data
from batchlab.data import bert
from batchlab.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL_TOKENS, PAD_ID, SEP_ID

SPECIAL = [PAD_ID, CLS_ID, SEP_ID]


@pytest.fixture(scope="module")
def corpus(data_dir):
    documents = data.get_dataset("mlm_corpus", "train", data_dir, config="small")
    vocab_size = data.mlm_tokenizer(data_dir, config="small").vocab_size
    return documents, vocab_size


@pytest.fixture(scope="module", params=[128, 512])
def source(request, corpus):
    documents, vocab_size = corpus
    return bert.BertPretrainingSource(
        documents, vocab_size=vocab_size, max_seq_length=request.param, seed=0
    )


def unmasked(example):
    """The input ids with the original tokens put back at the predicted positions."""
    ids = example["input_ids"].copy()
    count = int(example["masked_lm_weights"].sum())
    ids[example["masked_lm_positions"][:count]] = example["masked_lm_ids"][:count]
    return ids


def test_shapes_dtypes_and_layout(source):
    length = source.max_seq_length
    predictions = {128: 20, 512: 80}[length]
    assert source.max_predictions_per_seq == predictions
    for index in range(0, len(source), 7):
        example = source[index]
        assert set(example) == set(bert.FEATURES)
        for key, value in example.items():
            assert value.dtype == np.int32, key
        assert example["input_ids"].shape == (length,)
        assert example["masked_lm_positions"].shape == (predictions,)
        assert example["next_sentence_label"].shape == ()
        n = int(example["input_mask"].sum())
        assert (example["input_mask"][:n] == 1).all() and (example["input_mask"][n:] == 0).all()
        ids = unmasked(example)
        assert ids[0] == CLS_ID and ids[n - 1] == SEP_ID and (ids[n:] == PAD_ID).all()
        seps = np.flatnonzero(ids[:n] == SEP_ID)
        assert len(seps) == 2 and seps[0] >= 2 and seps[1] - seps[0] >= 2  # A, B non-empty.
        segments = example["segment_ids"]
        assert (segments[: seps[0] + 1] == 0).all() and (segments[seps[0] + 1 : n] == 1).all()
        assert (segments[n:] == 0).all()
        # 15% of the tokens (special ones included in the count), capped, at least one.
        count = int(example["masked_lm_weights"].sum())
        assert count == min(predictions, max(1, round(0.15 * n)))
        assert (example["masked_lm_weights"][:count] == 1).all()
        assert (example["masked_lm_weights"][count:] == 0).all()
        positions = example["masked_lm_positions"][:count]
        assert (np.diff(positions) > 0).all() and (positions > 0).all() and (positions < n).all()
        assert not np.isin(ids[positions], SPECIAL).any()  # Special tokens are never masked.
        assert not np.isin(example["masked_lm_ids"][:count], SPECIAL).any()


def test_masking_proportions_over_many_examples(corpus):
    documents, vocab_size = corpus
    source = bert.BertPretrainingSource(documents, vocab_size=vocab_size, dupe_factor=3, seed=4)
    masked = kept = replaced = 0
    for index in range(len(source)):
        example = source[index]
        count = int(example["masked_lm_weights"].sum())
        positions = example["masked_lm_positions"][:count]
        current = example["input_ids"][positions]
        original = example["masked_lm_ids"][:count]
        masked += int((current == MASK_ID).sum())
        kept += int((current == original).sum())
        replaced += int(((current != MASK_ID) & (current != original)).sum())
        assert not np.isin(current[current != MASK_ID], [PAD_ID, CLS_ID, SEP_ID, MASK_ID]).any()
    total = masked + kept + replaced
    assert total > 20_000
    # Binomial standard errors are about 0.003 (80%) and 0.002 (10%): these bounds are ~6 sigma.
    assert abs(masked / total - 0.8) < 0.02
    assert abs(kept / total - 0.1) < 0.015
    assert abs(replaced / total - 0.1) < 0.015


def test_mask_tokens_directly():
    rng = np.random.default_rng(0)
    ids = np.concatenate([[CLS_ID], rng.integers(NUM_SPECIAL_TOKENS, 100, 60), [SEP_ID]])
    ids = ids.astype(np.int32)
    corrupted, positions, originals = bert.mask_tokens(
        ids, np.random.default_rng(1), vocab_size=100, max_predictions=20
    )
    assert len(positions) == round(62 * 0.15) == 9
    np.testing.assert_array_equal(originals, ids[positions])
    unchanged = np.setdiff1d(np.arange(len(ids)), positions)
    np.testing.assert_array_equal(corrupted[unchanged], ids[unchanged])
    assert corrupted[0] == CLS_ID and corrupted[-1] == SEP_ID


def test_next_sentence_labels_and_actual_next_segments(source, corpus):
    documents, _ = corpus
    texts = [np.asarray(documents[i]["token_ids"]) for i in range(len(documents))]
    labels = np.array([int(source[i]["next_sentence_label"]) for i in range(len(source))])
    # 1/2 by the coin, plus chunks of a single sentence that must take a random B.
    assert 0.45 < labels.mean() < 0.7
    checked = 0
    for index in np.flatnonzero(labels == 0)[:200]:
        example = source[int(index)]
        n = int(example["input_mask"].sum())
        if n == source.max_seq_length:
            continue  # Possibly truncated: A and B need not be adjacent any more.
        ids = unmasked(example)[:n]
        seps = np.flatnonzero(ids == SEP_ID)
        pair = np.concatenate([ids[1 : seps[0]], ids[seps[0] + 1 : seps[1]]])
        # A followed by B is a contiguous stretch of one document.
        found = any(
            len(t) >= len(pair)
            and (np.lib.stride_tricks.sliding_window_view(t, len(pair)) == pair).all(1).any()
            for t in texts
        )
        assert found
        checked += 1
    assert checked >= 5


def test_segmentation_puts_unused_sentences_back():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=60)
    instances = bert._segment_document(lengths, rng, max_num_tokens=61, short_seq_prob=0.1)
    position = 0
    for start, a_end, end, target, is_random in instances:
        assert start == position and start < a_end <= end
        assert 2 <= target <= 61
        if is_random:
            assert end == a_end  # B comes from elsewhere; [a_end, ...) starts the next chunk.
        position = end
    assert position == len(lengths)


def test_truncate_pair():
    a, b = np.arange(50), np.arange(100, 110)
    ta, tb = bert.truncate_pair(a, b, 30, np.random.default_rng(0))
    assert len(ta) + len(tb) == 30 and len(tb) == 10  # Only the longer side is trimmed.
    assert np.isin(ta, a).all() and (np.diff(ta) == 1).all()


def test_examples_are_deterministic(corpus):
    documents, vocab_size = corpus
    first = bert.BertPretrainingSource(documents, vocab_size=vocab_size, seed=1)
    again = bert.BertPretrainingSource(documents, vocab_size=vocab_size, seed=1)
    other = bert.BertPretrainingSource(documents, vocab_size=vocab_size, seed=2)
    assert len(first) == len(again)
    for index in (0, 5, len(first) - 1):
        for key in bert.FEATURES:
            np.testing.assert_array_equal(first[index][key], again[index][key])
            np.testing.assert_array_equal(first[index][key], first[index][key])
    assert any(not np.array_equal(first[i]["input_ids"], other[i]["input_ids"]) for i in range(10))


def test_input_pipeline_yields_bert_batches(data_dir):
    with data.input_pipeline(
        "mlm_corpus",
        "train",
        16,
        data_dir=data_dir,
        config="small",
        max_seq_length=128,
        seed=3,
    ) as it:
        batch = next(it)
        state = it.get_state()
        following = next(it)
    assert batch["input_ids"].shape == (16, 128)
    assert batch["masked_lm_positions"].shape == (16, 20)
    assert batch["next_sentence_label"].shape == (16,)
    with data.input_pipeline(
        "mlm_corpus", "train", 16, data_dir=data_dir, config="small", seed=3, state=state
    ) as resumed:
        np.testing.assert_array_equal(next(resumed)["input_ids"], following["input_ids"])


def test_bad_arguments(corpus):
    documents, vocab_size = corpus
    with pytest.raises(ValueError, match="max_seq_length must be >= 5"):
        bert.BertPretrainingSource(documents, vocab_size=vocab_size, max_seq_length=4)
    with pytest.raises(ValueError, match="masked_lm_prob must be in"):
        bert.BertPretrainingSource(documents, vocab_size=vocab_size, masked_lm_prob=1.5)
    with pytest.raises(ValueError, match="documents must not be empty"):
        bert.BertPretrainingSource([], vocab_size=vocab_size)
