import os

# Tests never reach a model hub: fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_lm():
    from align.testing import tiny_causal_lm

    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once, then loaded from the cache)."""
    from align.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is faster, and on a shared busy machine OpenMP spin-waits of
    two threads dominate. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(items):
    import launching

    launching.MULTIPROCESS_TESTS.update(
        item.nodeid for item in items if item.get_closest_marker("multiprocess")
    )
