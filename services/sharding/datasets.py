"""Where the sharding service gets datasets from: the catalog interface and the tfds catalog.

The servicer only needs split sizes; building and finding datasets on disk is the catalog's
job, so servicer tests can inject a fake one.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping

from batchlab import data
from batchlab.limits import shorten
from batchlab.rpc.errors import FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)


class DatasetCatalog(abc.ABC):
    """The datasets a sharding service can prepare and describe.

    Attributes:
      data_dir: the tfds folder the datasets live in (reported to clients).
    """

    data_dir: str

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Returns the dataset names this catalog knows."""

    @abc.abstractmethod
    def resolve_config(self, dataset: str, config: str) -> str:
        """Returns the canonical config name ("" = the default becomes its real name).

        Args:
          dataset: a name from :meth:`names`.
          config: the requested config name, "" for the default.

        Raises:
          InvalidArgument: ``config``, listing the allowed ones.
        """

    @abc.abstractmethod
    def prepare(self, dataset: str, config: str, *, rebuild: bool = False) -> Mapping[str, int]:
        """Builds the dataset if missing (or always when ``rebuild``); returns split sizes.

        Args:
          dataset: a name from :meth:`names`.
          config: a name from :meth:`resolve_config`.
          rebuild: rebuild even when it is there.

        Raises:
          FailedPrecondition: when it cannot be built here (e.g. needs manual files).
        """

    @abc.abstractmethod
    def find(self, dataset: str, config: str) -> Mapping[str, int] | None:
        """Returns split sizes of an already built dataset, or None when it is not built.

        Args:
          dataset: a name from :meth:`names`.
          config: a name from :meth:`resolve_config`.
        """


class TfdsCatalog(DatasetCatalog):
    """The registered datasets of :mod:`batchlab.data`, built with tensorflow-datasets.

    Offline datasets (mnist1d, digits, mlm_corpus) are built by :func:`batchlab.data.prepare`;
    imagenet2012 must have been prepared beforehand and is only found.

    Args:
      data_dir: the tfds folder (``batchlab.data.default_data_dir()`` in the service).
    """

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = os.fspath(data_dir)

    def names(self) -> list[str]:
        """Returns the registered dataset names."""
        return data.list_datasets()

    def resolve_config(self, dataset: str, config: str) -> str:
        """Returns the canonical config name; see :meth:`DatasetCatalog.resolve_config`."""
        if not data.dataset_info(dataset).offline:
            if config:
                raise InvalidArgument("config", f"{dataset} takes no config; got {shorten(config)}")
            return ""
        from batchlab.data import builders

        try:
            builder = builders.builder(dataset, self.data_dir, config=config or None)
        except ValueError as exc:
            raise InvalidArgument("config", str(exc)) from None
        name: str = builder.builder_config.name
        return name

    def prepare(self, dataset: str, config: str, *, rebuild: bool = False) -> Mapping[str, int]:
        """Builds an offline dataset or finds imagenet2012; see :meth:`DatasetCatalog.prepare`."""
        if not data.dataset_info(dataset).offline:
            if rebuild:
                raise InvalidArgument("rebuild", f"{dataset} cannot be rebuilt by the service")
            sizes = self.find(dataset, config)
            if sizes is None:
                raise FailedPrecondition(
                    f"{dataset} is not prepared under {self.data_dir}; it needs the original "
                    "archives and is prepared once outside the service (see batchlab.data.imagenet)")
            return sizes
        builder = data.prepare(dataset, self.data_dir, config=config, rebuild=rebuild)
        return {name: split.num_examples for name, split in builder.info.splits.items()}

    def find(self, dataset: str, config: str) -> Mapping[str, int] | None:
        """Returns split sizes of a built dataset or None; see :meth:`DatasetCatalog.find`."""
        if not data.dataset_info(dataset).offline:
            from batchlab.data import imagenet

            try:
                return {split: len(imagenet.data_source(split, self.data_dir))
                        for split in imagenet.SPLIT_SIZES}
            except FileNotFoundError:
                return None
        from batchlab.data import builders

        builder = builders.builder(dataset, self.data_dir, config=config)
        if not builder.data_path.exists():
            return None
        return {name: split.num_examples for name, split in builder.info.splits.items()}
