"""Fixtures every test module gets, and the ``slow`` marker (shared helper functions are in helpers.py)."""

import pytest
import torch

#: The markers of tests that are not the library's own quick ones (pyproject.toml registers them): each also gets
#: ``slow``, so ``pytest -m "not slow"`` runs the library's tests alone.
SLOW = ("app", "multiprocess", "trainer", "bench", "compile", "zoo")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a 2-core machine busy with other jobs a second OpenMP
    thread only adds oversubscription. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
