"""Offline tfds builders (`mnist1d`, `digits`, `mlm_corpus`) and `prepare`, which builds them once.

Everything is generated from what is installed: mnist1d's generator, scikit-learn's bundled
digits, and the Python standard library's docstrings. Files are written as array_record, which
``builder.as_data_source()`` reads with random access into numpy, without TensorFlow.

Layout on disk: ``<data_dir>/<name>/<config>/<version>/``. A built dataset is reused until
``prepare(..., rebuild=True)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

# Imported here, not on a dataset's first load: its module body runs inside etils'
# lazy_imports(), which swaps the process-wide __import__ while it runs; a service that imports
# this module before serving (batchlab.rpc.server.run_service's preload) must not enter that
# block later, when another thread may be importing (gRPC's server imports on every call).
import tensorflow_datasets.core.dataset_metadata  # noqa: F401

from batchlab.data import mlm_corpus
from batchlab.data.paths import default_data_dir
from batchlab.limits import shorten

logger = logging.getLogger(__name__)

FILE_FORMAT = "array_record"


# --------------------------------------------------------------------------------- mnist1d


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
    """Configuration of the `mnist1d` builder.

    Attributes:
      num_samples: examples in total (a multiple of 10: mnist1d draws the same number per
        class); 80% go to 'train', 20% to 'validation' (mnist1d's own split).
      seed: mnist1d's generation seed (its default is 42).
    """

    num_samples: int = 50_000
    seed: int = 42


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D (Greydanus, 2020), generated locally with ``mnist1d.data.make_dataset``.

    Features: 'x' float32 (40,), standardised as mnist1d does; 'label' int64 in [0, 10).
    The generator seeds numpy's legacy global RNG, whose stream numpy keeps fixed across
    releases, so the data is the same on every machine; the global RNG state is restored after.
    """

    name = "mnist1d"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        Mnist1dConfig(name="default", description="50,000 examples: 40,000 / 10,000."),
        Mnist1dConfig(name="small", description="2,000 examples: for tests.", num_samples=2000),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="MNIST-1D: 1-D signals of 40 points from 10 digit templates.",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(40,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("x", "label"),
            homepage="https://github.com/greydanus/mnist1d",
            disable_shuffling=True,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # Generated locally; never call mnist1d's get_dataset (it downloads).
        import mnist1d.data  # Imported here: it pulls in matplotlib.

        config: Mnist1dConfig = self.builder_config
        if config.num_samples < 10 or config.num_samples % 10:
            raise ValueError(
                f"num_samples must be a positive multiple of 10; got {config.num_samples}"
            )
        args = mnist1d.data.get_dataset_args()
        args.num_samples = config.num_samples
        args.seed = config.seed
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            data = mnist1d.data.make_dataset(args)
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "validation": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(
        self, xs: np.ndarray, ys: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, (x, y) in enumerate(zip(xs, ys, strict=True)):
            yield index, {"x": x.astype(np.float32), "label": int(y)}


# ---------------------------------------------------------------------------------- digits


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
    """Configuration of the `digits` builder.

    Attributes:
      validation_fraction: share of the 1,797 images held out for 'validation'.
      split_seed: seed of the legacy numpy RandomState that picks them (its stream is frozen).
    """

    validation_fraction: float = 0.2
    split_seed: int = 0


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), shipped with sklearn.

    Features: 'image' float32 (8, 8, 1) in [0, 1] (pixel counts 0..16 divided by 16);
    'label' int64 in [0, 10). Default split: 1,438 'train' / 359 'validation', each in the
    original order.
    """

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DigitsConfig(name="default", description="80% train / 20% validation.")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="8x8 grey-scale handwritten digits from scikit-learn.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            disable_shuffling=True,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        from sklearn.datasets import load_digits

        config: DigitsConfig = self.builder_config
        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[..., None]
        labels = digits.target.astype(np.int64)
        num_validation = round(config.validation_fraction * len(labels))
        order = np.random.RandomState(config.split_seed).permutation(len(labels))
        validation = np.sort(order[:num_validation])
        train = np.sort(order[num_validation:])
        return {
            "train": self._generate_examples(images, labels, train),
            "validation": self._generate_examples(images, labels, validation),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}


# --------------------------------------------------------------------------------- prepare

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "mnist1d": Mnist1d,
    "digits": Digits,
    "mlm_corpus": mlm_corpus.MlmCorpus,
}
_CONFIG_CLASSES: dict[str, type[tfds.core.BuilderConfig]] = {
    "mnist1d": Mnist1dConfig,
    "digits": DigitsConfig,
    "mlm_corpus": mlm_corpus.MlmCorpusConfig,
}


def _check_name(name: str) -> None:
    if name not in BUILDERS:
        raise ValueError(f"name must be one of {sorted(BUILDERS)}; got {shorten(name)}")


def make_config(name: str, **overrides: Any) -> tfds.core.BuilderConfig:
    """Returns a config of builder ``name`` with fields changed from the defaults.

    The config's name spells out the overrides (e.g. ``num_samples5000``), so the same
    overrides always map to the same folder.

    Args:
      name: builder name.
      **overrides: config fields, e.g. ``num_samples=5000`` for mnist1d.

    Returns:
      The config.

    Raises:
      ValueError: if ``name`` or a field is unknown.
    """
    _check_name(name)
    config_cls = _CONFIG_CLASSES[name]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {
        f.name for f in dataclasses.fields(tfds.core.BuilderConfig)
    }
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {name} config fields {unknown}; allowed: {sorted(fields)}")
    if not overrides:
        return BUILDERS[name].BUILDER_CONFIGS[0]
    config_name = "_".join(f"{key}{value}" for key, value in sorted(overrides.items()))
    return config_cls(name=config_name.replace(".", "p"), **overrides)


def builder(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    **overrides: Any,
) -> tfds.core.GeneratorBasedBuilder:
    """Returns the (possibly unprepared) builder for an offline dataset.

    Args:
      name: 'mnist1d', 'digits' or 'mlm_corpus'.
      data_dir: root folder of the built datasets; :func:`default_data_dir` when None.
      config: a config name (e.g. 'small'), a config object, or None for the default.
      **overrides: config fields (see :func:`make_config`); not with ``config``.

    Returns:
      The builder, writing array_record files.

    Raises:
      ValueError: for an unknown name, config or field.
    """
    _check_name(name)
    if config is not None and overrides:
        raise ValueError("pass either config or config field overrides, not both")
    if overrides:
        config = make_config(name, **overrides)
    if isinstance(config, str):
        known = [c.name for c in BUILDERS[name].BUILDER_CONFIGS]
        if config not in known:
            raise ValueError(f"config of {name} must be one of {known}; got {shorten(config)}")
    data_dir = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    return BUILDERS[name](data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)


def prepare(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    rebuild: bool = False,
    **overrides: Any,
) -> tfds.core.GeneratorBasedBuilder:
    """Builds an offline dataset unless it is already built; returns its builder.

    A second call with the same arguments only checks that the folder exists.

    Args:
      name: 'mnist1d', 'digits' or 'mlm_corpus'.
      data_dir: root folder of the built datasets; :func:`default_data_dir` when None.
      config: a config name, a config object, or None for the default config.
      rebuild: delete and regenerate the dataset even if it exists.
      **overrides: config fields (see :func:`make_config`), e.g. ``num_samples=5000``.

    Returns:
      The prepared builder; read it with ``builder.as_data_source(split)``.

    Example:
      >>> b = prepare("digits", "/tmp/batchlab-tfds")  # doctest: +SKIP
      >>> b.as_data_source("train")[0]["image"].shape  # doctest: +SKIP
      (8, 8, 1)
    """
    result = builder(name, data_dir, config=config, **overrides)
    if result.data_path.exists() and not rebuild:
        logger.debug("%s already built at %s", name, result.data_dir)
        return result
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if rebuild
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    start = time.perf_counter()
    result.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=mode),
    )
    logger.info(
        "built %s (%s) at %s in %.1f s",
        name,
        result.builder_config.name,
        result.data_dir,
        time.perf_counter() - start,
    )
    return result
