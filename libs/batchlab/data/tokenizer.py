"""A small WordPiece tokenizer whose vocabulary is learned locally (deterministically).

Text is split into words BERT-style (lower-cased, accents stripped, every punctuation
character its own word, ``_`` counted as punctuation); the vocabulary is learned with byte-pair
style merges over those words, where a piece that continues a word carries the ``##`` prefix;
encoding is WordPiece's greedy longest-match-first, as in BERT. Ties between equally frequent
merges are broken by the pieces' text, so the same corpus always gives the same vocabulary.

References:
  Devlin et al., BERT (2018), for WordPiece encoding and the special tokens;
  Sennrich et al., Neural Machine Translation of Rare Words with Subword Units (2016), for
  learning subwords by merging the most frequent adjacent pair.
"""

from __future__ import annotations

import collections
import heapq
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
CONTINUATION = "##"
VOCAB_FILENAME = "vocab.txt"

# Runs of letters/digits, or any single other non-space character (punctuation, "_").
_WORD_RE = re.compile(r"[^\W_]+|[^\w\s]|_")


def basic_tokenize(text: str, *, lowercase: bool = True) -> list[str]:
    """Splits text into words and single punctuation characters (BERT's basic tokenizer).

    Args:
      text: any unicode text.
      lowercase: lower-case and strip accents (BERT "uncased").

    Returns:
      The words, in order. Control characters are dropped.
    """
    if lowercase:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    return [
        word
        for word in _WORD_RE.findall(text)
        if not (len(word) == 1 and unicodedata.category(word).startswith("C"))
    ]


def train_vocab(
    word_counts: Mapping[str, int],
    vocab_size: int,
    *,
    min_frequency: int = 2,
) -> list[str]:
    """Learns a WordPiece vocabulary by repeatedly merging the most frequent adjacent pieces.

    Args:
      word_counts: word -> occurrences, words as returned by :func:`basic_tokenize`.
      vocab_size: size of the returned vocabulary, special tokens included (an upper bound:
        learning stops early when no pair occurs ``min_frequency`` times).
      min_frequency: characters and merges seen fewer times are left out.

    Returns:
      The vocabulary: ``SPECIAL_TOKENS``, then every kept character in both its word-initial and
      ``##`` form, then the merged pieces in the order they were learned.

    Raises:
      ValueError: if ``vocab_size`` cannot hold the special tokens and the alphabet.
    """
    char_counts: collections.Counter[str] = collections.Counter()
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] += count
    alphabet = sorted(ch for ch, count in char_counts.items() if count >= min_frequency)
    vocab = list(SPECIAL_TOKENS) + alphabet + [CONTINUATION + ch for ch in alphabet]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size must be >= {len(vocab)} for this corpus (5 special tokens and "
            f"{len(alphabet)} characters in two forms); got {vocab_size}"
        )
    in_vocab = set(vocab)
    known = set(alphabet)

    words: list[list[str]] = []
    counts: list[int] = []
    for word in sorted(word_counts):
        if word and all(ch in known for ch in word):
            words.append([word[0]] + [CONTINUATION + ch for ch in word[1:]])
            counts.append(word_counts[word])

    pair_counts: dict[tuple[str, str], int] = collections.defaultdict(int)
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] += counts[index]
            where[pair].add(index)
    # Max-heap by count; ties by the pieces' text. Entries go stale when counts change and are
    # skipped when popped.
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        negative_count, a, b = heapq.heappop(heap)
        count = -negative_count
        if pair_counts.get((a, b), 0) != count:
            continue
        if count < min_frequency:
            break
        merged_piece = a + b[len(CONTINUATION) :]
        if merged_piece not in in_vocab:
            vocab.append(merged_piece)
            in_vocab.add(merged_piece)
        changed: set[tuple[str, str]] = set()
        for index in sorted(where.pop((a, b), ())):
            symbols = words[index]
            weight = counts[index]
            for pair in zip(symbols, symbols[1:], strict=False):
                pair_counts[pair] -= weight
                changed.add(pair)
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(merged_piece)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[index] = merged
            for pair in zip(merged, merged[1:], strict=False):
                pair_counts[pair] += weight
                where[pair].add(index)
                changed.add(pair)
        pair_counts.pop((a, b), None)
        for pair in changed:
            new_count = pair_counts.get(pair, 0)
            if new_count > 0:
                heapq.heappush(heap, (-new_count, *pair))
            else:
                pair_counts.pop(pair, None)
                where.pop(pair, None)
    return vocab


class WordPieceTokenizer:
    """Encodes text to ids with a WordPiece vocabulary (greedy longest match first).

    Args:
      vocab: tokens; a token's id is its position. Must start with ``SPECIAL_TOKENS``.
      lowercase: must match how the vocabulary was learned.
      max_chars_per_word: longer words become ``[UNK]`` (as in BERT).

    Example:
      >>> tok = WordPieceTokenizer.train(["the cat sat", "the cats sat"] * 2, vocab_size=60)
      >>> tok.decode(tok.encode("The cats"))
      'the cats'
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        lowercase: bool = True,
        max_chars_per_word: int = 100,
    ):
        if tuple(vocab[:NUM_SPECIAL_TOKENS]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with {list(SPECIAL_TOKENS)}; got {list(vocab[:5])}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate tokens")
        self._vocab = list(vocab)
        self._ids = {token: index for index, token in enumerate(self._vocab)}
        self._lowercase = lowercase
        self._max_chars = max_chars_per_word
        self._max_piece_chars = max(len(token.removeprefix(CONTINUATION)) for token in self._vocab)
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        lowercase: bool = True,
    ) -> WordPieceTokenizer:
        """Learns a vocabulary from ``texts`` (see :func:`train_vocab`) and returns a tokenizer.

        Args:
          texts: the training text, e.g. sentences.
          vocab_size: vocabulary size, special tokens included (an upper bound).
          min_frequency: minimum count of a character or merge.
          lowercase: lower-case and strip accents before splitting.

        Returns:
          A tokenizer using the learned vocabulary.
        """
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(basic_tokenize(text, lowercase=lowercase))
        vocab = train_vocab(counts, vocab_size, min_frequency=min_frequency)
        return cls(vocab, lowercase=lowercase)

    @property
    def vocab(self) -> list[str]:
        """The tokens, indexed by id."""
        return list(self._vocab)

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self._vocab)

    def token_to_id(self, token: str) -> int:
        """Returns the id of ``token``, or ``UNK_ID``."""
        return self._ids.get(token, UNK_ID)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        start = 0
        while start < len(word):
            if len(word) > self._max_chars:
                ids = [UNK_ID]
                break
            end = min(len(word), start + self._max_piece_chars)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                found = self._ids.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                ids = [UNK_ID]
                break
            ids.append(found)
            start = end
        result = tuple(ids)
        self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of ``text`` (no special tokens added)."""
        ids: list[int] = []
        for word in basic_tokenize(text, lowercase=self._lowercase):
            ids.extend(self._word_ids(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Returns the WordPiece tokens of ``text``."""
        return [self._vocab[i] for i in self.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Joins ids back into text: ``##`` pieces attach to the previous token."""
        out: list[str] = []
        for i in ids:
            token = self._vocab[int(i)]
            if token.startswith(CONTINUATION) and out:
                out[-1] += token[len(CONTINUATION) :]
            else:
                out.append(token)
        return " ".join(out)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the vocabulary, one token per line (UTF-8); the line number is the id."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self._vocab) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, lowercase: bool = True) -> WordPieceTokenizer:
        """Reads a vocabulary written by :meth:`save`.

        Args:
          path: the vocab file.
          lowercase: must match how the vocabulary was learned.

        Returns:
          The tokenizer.
        """
        with open(path, encoding="utf-8") as f:
            vocab = f.read().split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        return cls(vocab, lowercase=lowercase)
