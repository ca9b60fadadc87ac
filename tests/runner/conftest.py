import os

import pytest


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A data folder with the small mnist1d config built once for the session."""
    root = tmp_path_factory.mktemp("runner_data")
    os.environ.setdefault("TMPDIR", str(root))
    from batchlab.data import prepare

    prepare("mnist1d", root, config="small")
    return str(root)
