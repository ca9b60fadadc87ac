"""BERT pretraining examples (masked LM + next sentence) from a tokenized document corpus.

The recipe is the official BERT one (``create_pretraining_data.py``, Devlin et al., 2018) used
by the paper (Nado et al., 2021, Appendix B.2), re-implemented on token ids and made
random-access:

* Each document (a list of tokenized sentences) is cut into chunks of whole sentences of about
  ``max_seq_length - 3`` tokens (with probability ``short_seq_prob`` a shorter random target).
  A chunk splits at a random sentence boundary into A and B. With probability 1/2, or when the
  chunk has one sentence, B is instead taken from a random other document
  (``next_sentence_label = 1``), and the unused sentences of the chunk start the next chunk;
  otherwise B is the actual continuation (label 0). The pair is truncated to fit, one token at
  a time from the longer side, at the front or the back with probability 1/2 each.
* ``[CLS] A [SEP] B [SEP]``, segment ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``.
* Masked LM: ``min(max_predictions_per_seq, max(1, round(0.15 * num_tokens)))`` positions,
  never ``[CLS]``/``[SEP]``/``[PAD]``, chosen uniformly; of those 80% become ``[MASK]``, 10% a
  random non-special token and 10% stay unchanged.

Two deliberate differences: the chunk target length is drawn per chunk (BERT draws it once per
document), and a random replacement token is never a special token (BERT draws from the whole
vocabulary). Chunking is computed once, up front, from ``(seed, dupe, document)``; an
example's remaining randomness (random document, truncation, masking) from ``(seed, index)``.
So ``source[i]`` is the same on every call and every machine, and the source can be sharded
like any other.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from batchlab.data import sharding
from batchlab.data.pipeline import RandomAccessSource
from batchlab.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL_TOKENS, PAD_ID, SEP_ID

logger = logging.getLogger(__name__)

MAX_PREDICTIONS_PER_SEQ = {128: 20, 512: 80}
MASKED_LM_PROB = 0.15
SHORT_SEQ_PROB = 0.1
SEGMENT_DOMAIN = 0x5347  # "SG": chunking of documents into instances.
INSTANCE_DOMAIN = 0x4249  # "BI": per-instance randomness.
FEATURES = (
    "input_ids",
    "input_mask",
    "segment_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_label",
)


def default_max_predictions(max_seq_length: int, masked_lm_prob: float = MASKED_LM_PROB) -> int:
    """Returns BERT's max_predictions_per_seq: 20 for 128, 80 for 512, else ceil(p * length)."""
    if max_seq_length in MAX_PREDICTIONS_PER_SEQ and masked_lm_prob == MASKED_LM_PROB:
        return MAX_PREDICTIONS_PER_SEQ[max_seq_length]
    return math.ceil(max_seq_length * masked_lm_prob)


def truncate_pair(
    tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Trims a pair to ``max_num_tokens`` one token at a time from the longer side.

    Each removed token comes from the front or the back with probability 1/2 (BERT's
    ``truncate_seq_pair``).

    Args:
      tokens_a: first segment.
      tokens_b: second segment.
      max_num_tokens: maximum combined length (>= 2).
      rng: source of randomness.

    Returns:
      The truncated ``(tokens_a, tokens_b)``.
    """
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    draws = rng.random(excess)
    bounds = [[0, len(tokens_a)], [0, len(tokens_b)]]
    for draw in draws:
        longer = 0 if bounds[0][1] - bounds[0][0] > bounds[1][1] - bounds[1][0] else 1
        if draw < 0.5:
            bounds[longer][0] += 1
        else:
            bounds[longer][1] -= 1
    return tokens_a[bounds[0][0] : bounds[0][1]], tokens_b[bounds[1][0] : bounds[1][1]]


def mask_tokens(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    max_predictions: int,
    masked_lm_prob: float = MASKED_LM_PROB,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Applies BERT's masked-LM corruption to one unpadded sequence.

    Args:
      input_ids: token ids including ``[CLS]``/``[SEP]`` (no padding).
      rng: source of randomness.
      vocab_size: vocabulary size; random replacements are drawn from the non-special ids.
      max_predictions: cap on the number of predicted positions.
      masked_lm_prob: fraction of tokens to predict.

    Returns:
      ``(corrupted_ids, positions, original_ids)``: the corrupted copy, the sorted predicted
      positions and the original ids there.
    """
    input_ids = np.asarray(input_ids, np.int32)
    candidates = np.flatnonzero(~np.isin(input_ids, (CLS_ID, SEP_ID, PAD_ID)))
    num_to_predict = min(
        max_predictions, max(1, int(round(len(input_ids) * masked_lm_prob))), len(candidates)
    )
    positions = np.sort(rng.permutation(candidates)[:num_to_predict])
    originals = input_ids[positions]
    draws = rng.random(num_to_predict)
    replacements = rng.integers(NUM_SPECIAL_TOKENS, vocab_size, num_to_predict, dtype=np.int32)
    corrupted = input_ids.copy()
    corrupted[positions[draws < 0.8]] = MASK_ID
    randomised = draws >= 0.9
    corrupted[positions[randomised]] = replacements[randomised]
    return corrupted, positions.astype(np.int32), originals


def _segment_document(
    sentence_lengths: np.ndarray,
    rng: np.random.Generator,
    max_num_tokens: int,
    short_seq_prob: float,
) -> list[tuple[int, int, int, int, int]]:
    """Cuts one document into instances ``(start, a_end, end, target_length, is_random)``.

    Sentences ``[start, a_end)`` form A; B is ``[a_end, end)``, or a random document's when
    ``is_random`` (then ``end == a_end`` and the next chunk starts at ``a_end``).
    """

    def draw_target() -> int:
        if rng.random() < short_seq_prob:
            return int(rng.integers(2, max_num_tokens + 1))
        return max_num_tokens

    instances = []
    num_sentences = len(sentence_lengths)
    start = 0
    length = 0
    target = draw_target()
    i = 0
    while i < num_sentences:
        length += int(sentence_lengths[i])
        if i == num_sentences - 1 or length >= target:
            chunk = i + 1 - start
            a_end = start + (1 if chunk == 1 else int(rng.integers(1, chunk)))
            is_random = chunk == 1 or rng.random() < 0.5
            if is_random:
                instances.append((start, a_end, a_end, target, 1))
                i = a_end - 1  # Put the unused sentences back.
            else:
                instances.append((start, a_end, i + 1, target, 0))
            start = i + 1
            length = 0
            target = draw_target()
        i += 1
    return instances


class BertPretrainingSource:
    """Random-access BERT pretraining examples built from a tokenized document source.

    Args:
      documents: random-access source of documents, each a dict with 'token_ids' (int,
        sentences concatenated) and 'sentence_lengths' (e.g. ``get_dataset('mlm_corpus',
        'train')``; Wikipedia + BooksCorpus stored the same way would do).
      vocab_size: vocabulary size (ids ``[0, 5)`` are the special tokens).
      max_seq_length: sequence length (128 and 512 in the paper).
      max_predictions_per_seq: masked positions per sequence; 20 for 128, 80 for 512 by
        default.
      masked_lm_prob: fraction of tokens to predict.
      short_seq_prob: probability of a shorter random target length.
      dupe_factor: how many times to cut the corpus (each with other cuts and masks); BERT
        used 10.
      seed: data seed.

    Each example is a dict of int32 arrays: 'input_ids', 'input_mask', 'segment_ids'
    (max_seq_length,); 'masked_lm_positions', 'masked_lm_ids', 'masked_lm_weights'
    (max_predictions_per_seq,); 'next_sentence_label' () with 1 = B is a random segment.

    All documents are read once at construction (their sentence lengths decide the cuts) and
    kept in memory: fine for `mlm_corpus`, too much for the full Wikipedia + Books corpus.
    """

    def __init__(
        self,
        documents: RandomAccessSource,
        *,
        vocab_size: int,
        max_seq_length: int = 128,
        max_predictions_per_seq: int | None = None,
        masked_lm_prob: float = MASKED_LM_PROB,
        short_seq_prob: float = SHORT_SEQ_PROB,
        dupe_factor: int = 1,
        seed: int = 0,
    ):
        self._max_seq_length = sharding.check_int("max_seq_length", max_seq_length, minimum=5)
        self._vocab_size = sharding.check_int(
            "vocab_size", vocab_size, minimum=NUM_SPECIAL_TOKENS + 1
        )
        if max_predictions_per_seq is None:
            max_predictions_per_seq = default_max_predictions(max_seq_length, masked_lm_prob)
        self._max_predictions = sharding.check_int(
            "max_predictions_per_seq", max_predictions_per_seq, minimum=1
        )
        if not 0.0 < masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob must be in (0, 1); got {masked_lm_prob}")
        if not 0.0 <= short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob must be in [0, 1]; got {short_seq_prob}")
        self._masked_lm_prob = masked_lm_prob
        self._seed = sharding.check_int("seed", seed, minimum=0)
        dupe_factor = sharding.check_int("dupe_factor", dupe_factor, minimum=1)
        if len(documents) == 0:
            raise ValueError("documents must not be empty")

        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for index in range(len(documents)):
            document = documents[index]
            lengths = np.asarray(document["sentence_lengths"], np.int64)
            self._tokens.append(np.asarray(document["token_ids"], np.int32))
            self._offsets.append(np.concatenate([[0], np.cumsum(lengths)]))

        max_num_tokens = self._max_seq_length - 3
        rows = []
        for dupe in range(dupe_factor):
            for doc_index, offsets in enumerate(self._offsets):
                rng = np.random.Generator(
                    np.random.PCG64([SEGMENT_DOMAIN, self._seed, dupe, doc_index])
                )
                for instance in _segment_document(
                    np.diff(offsets), rng, max_num_tokens, short_seq_prob
                ):
                    rows.append((doc_index, *instance))
        self._instances = np.asarray(rows, np.int64).reshape(-1, 6)
        logger.info(
            "BERT source: %d documents -> %d instances (max_seq_length %d, dupe_factor %d)",
            len(self._tokens),
            len(self._instances),
            self._max_seq_length,
            dupe_factor,
        )

    @property
    def max_seq_length(self) -> int:
        """Sequence length of every example."""
        return self._max_seq_length

    @property
    def max_predictions_per_seq(self) -> int:
        """Masked positions per example (padded)."""
        return self._max_predictions

    def __len__(self) -> int:
        return len(self._instances)

    def _sentences(self, doc_index: int, start: int, end: int) -> np.ndarray:
        offsets = self._offsets[doc_index]
        return self._tokens[doc_index][offsets[start] : offsets[end]]

    def __getitem__(self, index: int) -> dict[str, np.ndarray | np.int32]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        doc_index, start, a_end, end, target, is_random = (int(v) for v in self._instances[index])
        rng = np.random.Generator(np.random.PCG64([INSTANCE_DOMAIN, self._seed, index]))
        tokens_a = self._sentences(doc_index, start, a_end)
        if is_random:
            tokens_b = self._random_segment(doc_index, target - len(tokens_a), rng)
        else:
            tokens_b = self._sentences(doc_index, a_end, end)
        tokens_a, tokens_b = truncate_pair(tokens_a, tokens_b, self._max_seq_length - 3, rng)
        ids = np.concatenate([[CLS_ID], tokens_a, [SEP_ID], tokens_b, [SEP_ID]]).astype(np.int32)
        corrupted, positions, originals = mask_tokens(
            ids,
            rng,
            vocab_size=self._vocab_size,
            max_predictions=self._max_predictions,
            masked_lm_prob=self._masked_lm_prob,
        )
        length, num_predictions = len(ids), len(positions)
        example: dict[str, np.ndarray] = {
            "input_ids": np.zeros(self._max_seq_length, np.int32),
            "input_mask": np.zeros(self._max_seq_length, np.int32),
            "segment_ids": np.zeros(self._max_seq_length, np.int32),
            "masked_lm_positions": np.zeros(self._max_predictions, np.int32),
            "masked_lm_ids": np.zeros(self._max_predictions, np.int32),
            "masked_lm_weights": np.zeros(self._max_predictions, np.int32),
        }
        example["input_ids"][:length] = corrupted
        example["input_mask"][:length] = 1
        example["segment_ids"][len(tokens_a) + 2 : length] = 1
        example["masked_lm_positions"][:num_predictions] = positions
        example["masked_lm_ids"][:num_predictions] = originals
        example["masked_lm_weights"][:num_predictions] = 1
        return {**example, "next_sentence_label": np.int32(is_random)}

    def _random_segment(
        self, doc_index: int, target_length: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Sentences from a random other document, from a random start, up to target_length."""
        num_docs = len(self._tokens)
        other = doc_index
        for _ in range(10):
            other = int(rng.integers(num_docs))
            if other != doc_index:
                break
        offsets = self._offsets[other]
        num_sentences = len(offsets) - 1
        first = int(rng.integers(num_sentences))
        # The smallest end whose tokens reach target_length (at least one sentence).
        reach = np.searchsorted(offsets, offsets[first] + max(target_length, 1), side="left")
        last = int(min(max(reach, first + 1), num_sentences))
        return self._sentences(other, first, last)
