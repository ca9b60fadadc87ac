"""Fixtures for the data tests: a private TMPDIR and small datasets built once per session."""

from __future__ import annotations

import os
import tempfile

import pytest

from batchlab import data


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Points TMPDIR (and tempfile's cached default) at a test folder.

    tfds leaves empty ``tmp*tfds`` folders in the temp folder; they go here, not in /tmp.
    """
    path = tmp_path_factory.mktemp("tmpdir")
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    yield path
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds folder with digits, mnist1d 'small' and mlm_corpus 'small' built (about 5 s)."""
    path = tmp_path_factory.mktemp("tfds")
    data.prepare("digits", path)
    data.prepare("mnist1d", path, config="small")
    data.prepare("mlm_corpus", path, config="small")
    return path
