"""Fixtures for the data tests: small datasets built once per session (TMPDIR: tests/conftest.py)."""

from __future__ import annotations

import pytest

from batchlab import data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds folder with digits, mnist1d 'small' and mlm_corpus 'small' built (about 5 s)."""
    path = tmp_path_factory.mktemp("tfds")
    data.prepare("digits", path)
    data.prepare("mnist1d", path, config="small")
    data.prepare("mlm_corpus", path, config="small")
    return path
