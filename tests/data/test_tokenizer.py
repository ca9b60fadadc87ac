"""WordPiece tokenizer learned locally: splitting, deterministic vocabulary, encoding, files."""

from __future__ import annotations

import pytest

from batchlab.data import tokenizer
from batchlab.data.tokenizer import WordPieceTokenizer, basic_tokenize, train_vocab

TEXTS = [
    "Return the number of items in the container.",
    "Return True if the container holds no items.",
    "The container's items are returned in insertion order.",
    "Raise KeyError if the key is missing; see get_item() for a default.",
] * 3


def test_basic_tokenize_splits_punctuation_and_underscores():
    assert basic_tokenize("Héllo, get_item()!") == ["hello", ",", "get", "_", "item", "(", ")", "!"]
    assert basic_tokenize("MiXeD", lowercase=False) == ["MiXeD"]
    assert basic_tokenize("a\x00b") == ["a", "b"]


def test_vocabulary_is_deterministic_and_starts_with_special_tokens():
    first = WordPieceTokenizer.train(TEXTS, vocab_size=120).vocab
    second = WordPieceTokenizer.train(list(reversed(TEXTS)), vocab_size=120).vocab
    assert first == second
    assert first[: tokenizer.NUM_SPECIAL_TOKENS] == list(tokenizer.SPECIAL_TOKENS)
    assert (tokenizer.PAD_ID, tokenizer.UNK_ID, tokenizer.MASK_ID) == (0, 1, 4)
    assert len(first) == len(set(first)) <= 120


def test_frequent_words_become_single_tokens():
    tok = WordPieceTokenizer.train(TEXTS, vocab_size=200)
    assert tok.tokenize("the container items") == ["the", "container", "items"]
    pieces = tok.tokenize("containers")  # Unseen word: split into known pieces.
    assert pieces[0] == "container" and all(p.startswith("##") for p in pieces[1:])
    assert tok.decode(tok.encode("Return the items.")) == "return the items ."


def test_unknown_characters_become_unk():
    tok = WordPieceTokenizer.train(TEXTS, vocab_size=200)
    assert tok.encode("zebra") == [tokenizer.UNK_ID]  # 'z' never occurs.
    assert tok.token_to_id("no-such-token") == tokenizer.UNK_ID


def test_merges_stop_below_min_frequency():
    vocab = train_vocab({"ab": 3, "ac": 1, "bd": 1}, 100, min_frequency=2)
    assert "ab" in vocab and "c" not in vocab and "bd" not in vocab
    assert "bd" in train_vocab({"ab": 3, "ac": 1, "bd": 1}, 100, min_frequency=1)


def test_save_and_load_round_trip(tmp_path):
    tok = WordPieceTokenizer.train(TEXTS, vocab_size=150)
    path = tmp_path / "vocab.txt"
    tok.save(path)
    loaded = WordPieceTokenizer.load(path)
    assert loaded.vocab == tok.vocab
    assert loaded.encode(TEXTS[3]) == tok.encode(TEXTS[3])


def test_errors():
    with pytest.raises(ValueError, match="vocab_size must be >= "):
        train_vocab({"abcdefghij": 5}, 10)
    with pytest.raises(ValueError, match="vocab must start with"):
        WordPieceTokenizer(["a", "b"])
