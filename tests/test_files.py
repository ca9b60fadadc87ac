"""batchlab.files.atomic_write: the old content or the new, never a torn file."""

from __future__ import annotations

import os

import pytest

from batchlab.files import atomic_write


def test_it_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "run.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic_write(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_named_temporary_prefix_is_used(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: seen.append(os.path.basename(src)) or real(src, dst))
    atomic_write(tmp_path / "meta", b"x", temp_prefix=".tmp-")
    assert seen and seen[0].startswith(".tmp-")
