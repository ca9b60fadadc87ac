"""A skip that is not on tests/conftest.py's ALLOWED_SKIPS fails the run (issue 12: a test that
skips on a fresh machine is a hidden failure)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def _run(pytester, monkeypatch, tests: str):
    """Run `tests` in a fresh pytest process that has only the guard's two hooks."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest("from tests.conftest import pytest_runtest_logreport, pytest_sessionfinish\n")
    pytester.makepyfile(test_x=tests)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_an_unlisted_skip_fails_the_run_and_a_listed_one_does_not(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, """
        import pytest

        def test_needs_the_network():
            pytest.skip("the network is down")

        def test_needs_cores():
            pytest.skip("needs 2 CPUs")

        def test_runs():
            pass
    """)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*skips not on tests/conftest.py's ALLOWED_SKIPS*",
                                 "*test_x.py::test_needs_the_network*the network is down*"])
    assert "test_needs_cores" not in result.stdout.str().split("ALLOWED_SKIPS", 1)[1]


def test_allowed_skips_only_leave_the_run_green(pytester, monkeypatch):
    assert _run(pytester, monkeypatch, """
        import pytest

        def test_needs_cores():
            pytest.skip("needs 2 CPUs")
    """).ret == 0
