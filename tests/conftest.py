"""Fixtures several test modules share, and the tiers the folders stand for.

    tests/unit/         the math and its glue: losses, rewards, segmentation, parsing, metrics,
                        the sampler against generate (`make test-fast`, under a minute)
    tests/components/   one part each, on small files or models: data, catalog, sandbox,
                        teacher, embedders, compiled decoding, docs
    tests/integration/  the scripts end to end, in-process or as subprocesses (marked `integration`;
                        the torchrun ones are marked `slow` too)
    tests/real/         a real chat model and the authors' sample (marked `real`, `make test-real`)
"""
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Every test under tests/integration/ carries the `integration` marker."""
    for item in items:
        if (TESTS / "integration") in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine waiting threads
    make these tests several times slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
