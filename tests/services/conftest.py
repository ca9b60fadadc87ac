"""Fixtures for the service tests: a private TMPDIR (tfds and spooled uploads write there)."""

from __future__ import annotations

import os
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Points TMPDIR (and tempfile's cached default) at a test folder."""
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
