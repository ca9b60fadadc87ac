"""The registered datasets and what a model and a study need to know about each."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from batchlab.data import imagenet

__all__ = ["DATASETS", "DatasetInfo", "dataset_info", "list_datasets"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a study need to know about a dataset.

    Attributes:
      name: registered name.
      input_key: feature holding the model input after preprocessing.
      input_shape: shape of one preprocessed input.
      num_classes: number of labels (None for the masked-LM corpus).
      splits: examples per split for the default config, or None where it depends on the
        machine (``mlm_corpus``: documents from this Python's stdlib).
      offline: True when :func:`prepare` builds it from installed packages.
      description: one line.
    """

    name: str
    input_key: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    splits: Mapping[str, int] | None
    offline: bool
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist1d": DatasetInfo(
        "mnist1d",
        "x",
        (40,),
        10,
        {"train": 40_000, "validation": 10_000},
        True,
        "MNIST-1D signals generated locally (seed 42).",
    ),
    "digits": DatasetInfo(
        "digits",
        "image",
        (8, 8, 1),
        10,
        {"train": 1_438, "validation": 359},
        True,
        "scikit-learn 8x8 digits scaled to [0, 1].",
    ),
    "mlm_corpus": DatasetInfo(
        "mlm_corpus",
        "input_ids",
        (128,),
        None,
        None,
        True,
        "Python stdlib docstrings, WordPiece-tokenized; input_pipeline yields BERT examples.",
    ),
    "imagenet2012": DatasetInfo(
        "imagenet2012",
        "image",
        (224, 224, 3),
        imagenet.NUM_CLASSES,
        dict(imagenet.SPLIT_SIZES),
        False,
        "ILSVRC 2012 with MLPerf ResNet-50 preprocessing (tfds, prepared beforehand).",
    ),
}


def list_datasets() -> list[str]:
    """Returns the registered dataset names."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Returns the metadata of a registered dataset.

    Raises:
      ValueError: for an unknown name, listing the allowed ones.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {list_datasets()}; got {name!r}")
    return DATASETS[name]
