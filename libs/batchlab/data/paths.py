"""Where built datasets live by default."""

from __future__ import annotations

import os
import pathlib

DATA_DIR_ENV = "BATCHLAB_DATA_DIR"


def default_data_dir() -> pathlib.Path:
    """Returns ``$BATCHLAB_DATA_DIR/tfds``, or ``~/.cache/batchlab/tfds`` when unset."""
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return pathlib.Path(root) / "tfds"
    return pathlib.Path.home() / ".cache" / "batchlab" / "tfds"
