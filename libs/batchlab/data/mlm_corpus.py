"""`mlm_corpus`: a masked-LM corpus from the docstrings of Python's standard library.

Every machine with CPython 3.11 has this text, so the corpus needs no download. One document
per stdlib module (files under ``sysconfig.get_paths()['stdlib']``, sorted by path, test
folders and third-party ``site-packages`` excluded); its sentences are the module's docstrings
in source order, split at sentence ends, with doctest and indented code lines kept one per
"sentence". A WordPiece vocabulary is learned from the training documents (see
:mod:`batchlab.data.tokenizer`) and saved as ``vocab.txt`` in the dataset folder; the builder
stores each document as its token ids plus sentence lengths, so the BERT pipeline
(:mod:`batchlab.data.bert`) can form sentence pairs.

Documents go to 'validation' when the SHA-256 of their path falls in the lowest
``validation_fraction`` of the hash range, else to 'train'. ``metadata.json`` records the Python
version and a SHA-256 of the extracted text, since another CPython patch release has slightly
different docstrings.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import pathlib
import platform
import re
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from batchlab.data import tokenizer as tokenizer_lib

logger = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[`])")


@dataclasses.dataclass(frozen=True)
class Document:
    """One module's text: its path relative to the stdlib folder and its sentences."""

    path: str
    sentences: tuple[str, ...]


def stdlib_dir() -> pathlib.Path:
    """Returns the folder of this interpreter's standard library sources."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[tuple[str, pathlib.Path]]:
    """Lists the stdlib ``.py`` files used for the corpus, sorted by relative path.

    Args:
      root: the stdlib folder; this interpreter's by default.

    Returns:
      ``(relative posix path, absolute path)`` pairs.
    """
    root = root or stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(relative.parts[:-1]):
            files.append((relative.as_posix(), path))
    return sorted(files)


def docstrings(source: bytes) -> list[str]:
    """Returns the module, class and function docstrings of Python source, in line order.

    Args:
      source: the file's bytes.

    Returns:
      Cleaned docstrings (``inspect.cleandoc`` indentation rules).

    Raises:
      SyntaxError, ValueError: if the source does not parse.
    """
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
            if text:
                found.append((getattr(node, "lineno", 0), text))
    found.sort(key=lambda item: item[0])
    return [text for _, text in found]


def split_sentences(text: str) -> list[str]:
    """Splits a docstring into sentences.

    Paragraphs are separated by blank lines. A paragraph with doctest (``>>>``) or indented
    lines is kept line by line; prose paragraphs are re-flowed and split after ``.``, ``!``
    or ``?`` followed by a capital, digit, quote or bracket.

    Args:
      text: a cleaned docstring.

    Returns:
      Non-empty sentences with whitespace collapsed.
    """
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        if any(line.lstrip().startswith(">>>") or line[:1].isspace() for line in lines):
            sentences.extend(" ".join(line.split()) for line in lines)
            continue
        prose = " ".join(" ".join(line.split()) for line in lines)
        sentences.extend(part.strip() for part in _SENTENCE_END.split(prose) if part.strip())
    return sentences


def read_documents(
    root: pathlib.Path | None = None, *, max_documents: int | None = None
) -> list[Document]:
    """Extracts the corpus documents from the stdlib sources.

    Args:
      root: the stdlib folder; this interpreter's by default.
      max_documents: keep an evenly spaced subset of this many files (small test configs).

    Returns:
      Documents with at least one sentence, sorted by path.
    """
    files = stdlib_files(root)
    if max_documents is not None and max_documents < len(files):
        step = len(files) / max_documents
        files = [files[int(i * step)] for i in range(max_documents)]
    documents = []
    for relative, path in files:
        try:
            texts = docstrings(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError) as error:
            logger.warning("skipping %s: %s", relative, error)
            continue
        sentences = tuple(s for text in texts for s in split_sentences(text))
        if sentences:
            documents.append(Document(relative, sentences))
    return documents


def is_validation(path: str, validation_fraction: float) -> bool:
    """Whether a document goes to 'validation': its path's SHA-256 decides, stably."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2**64


def corpus_sha256(documents: Sequence[Document]) -> str:
    """Returns a SHA-256 over the documents' paths and sentences (to compare machines)."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.path.encode("utf-8") + b"\0")
        for sentence in document.sentences:
            digest.update(sentence.encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclasses.dataclass
class MlmCorpusConfig(tfds.core.BuilderConfig):
    """Configuration of the `mlm_corpus` builder.

    Attributes:
      vocab_size: WordPiece vocabulary size, special tokens included (an upper bound).
      min_frequency: minimum count of a character or merge in the vocabulary.
      max_documents: use an evenly spaced subset of this many stdlib files; None for all.
      validation_fraction: share of documents (by path hash) in 'validation'.
    """

    vocab_size: int = 8192
    min_frequency: int = 2
    max_documents: int | None = None
    validation_fraction: float = 0.1


class MlmCorpus(tfds.core.GeneratorBasedBuilder):
    """Tokenized stdlib docstring documents for BERT-style pretraining.

    Features: 'token_ids' int32 (num_tokens,), all sentences concatenated;
    'sentence_lengths' int32 (num_sentences,), summing to num_tokens; 'path' (bytes), the
    module's path under the stdlib folder. The vocabulary is ``<dataset dir>/vocab.txt``.
    """

    name = "mlm_corpus"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        MlmCorpusConfig(name="default", description="All stdlib modules, vocab 8192."),
        MlmCorpusConfig(
            name="small",
            description="80 modules, vocab 1024: for tests.",
            vocab_size=1024,
            max_documents=80,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Python stdlib docstrings as documents of WordPiece token ids.",
            features=tfds.features.FeaturesDict(
                {
                    "token_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "sentence_lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "path": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # Everything is local.
        config: MlmCorpusConfig = self.builder_config
        start = time.perf_counter()
        documents = read_documents(max_documents=config.max_documents)
        splits: dict[str, list[Document]] = {"train": [], "validation": []}
        for document in documents:
            split = (
                "validation"
                if is_validation(document.path, config.validation_fraction)
                else "train"
            )
            splits[split].append(document)
        logger.info(
            "mlm_corpus: %d documents (%d train, %d validation) read in %.1f s",
            len(documents),
            len(splits["train"]),
            len(splits["validation"]),
            time.perf_counter() - start,
        )
        start = time.perf_counter()
        tokenizer = tokenizer_lib.WordPieceTokenizer.train(
            (s for document in splits["train"] for s in document.sentences),
            config.vocab_size,
            min_frequency=config.min_frequency,
        )
        tokenizer.save(pathlib.Path(self.data_dir) / tokenizer_lib.VOCAB_FILENAME)
        logger.info(
            "mlm_corpus: learned %d tokens in %.1f s",
            tokenizer.vocab_size,
            time.perf_counter() - start,
        )
        self.info.metadata.update(
            {
                "vocab_size": tokenizer.vocab_size,
                "special_tokens": list(tokenizer_lib.SPECIAL_TOKENS),
                "python_version": platform.python_version(),
                "corpus_sha256": corpus_sha256(documents),
            }
        )
        return {split: self._generate_examples(docs, tokenizer) for split, docs in splits.items()}

    def _generate_examples(
        self, documents: Sequence[Document], tokenizer: tokenizer_lib.WordPieceTokenizer
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for document in documents:
            encoded = [tokenizer.encode(sentence) for sentence in document.sentences]
            encoded = [ids for ids in encoded if ids]
            if not encoded:
                continue
            yield (
                document.path,
                {
                    "token_ids": np.asarray([i for ids in encoded for i in ids], np.int32),
                    "sentence_lengths": np.asarray([len(ids) for ids in encoded], np.int32),
                    "path": document.path,
                },
            )

    def tokenizer(self) -> tokenizer_lib.WordPieceTokenizer:
        """Loads the vocabulary saved with the prepared dataset."""
        path = pathlib.Path(self.data_dir) / tokenizer_lib.VOCAB_FILENAME
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: prepare the dataset first")
        return tokenizer_lib.WordPieceTokenizer.load(path)


def document_sentences(example: Mapping[str, Any]) -> list[np.ndarray]:
    """Splits a stored document back into its sentences' token-id arrays.

    Args:
      example: an `mlm_corpus` example with 'token_ids' and 'sentence_lengths'.

    Returns:
      One int32 array per sentence.
    """
    ends = np.cumsum(example["sentence_lengths"])
    return np.split(np.asarray(example["token_ids"], np.int32), ends[:-1])
