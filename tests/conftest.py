import os

# One intra-op thread for the tests and the processes they start: the tensors are tiny, so extra threads only
# spin (measured 3-26x slower on a loaded 2-core machine) and the float bits would depend on the machine's core
# count. SAICL_TEST_THREADS overrides it.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SAICL_TEST_THREADS", "1"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("SAICL_TEST_THREADS", os.environ["OMP_NUM_THREADS"])))

# Without CUDA the Triton kernels can only run in the interpreter, and the flag must be set before
# saicl.kernels is first imported (triton.jit reads it then). With CUDA the `gpu` tests run the
# compiled, autotuned kernels, so the flag is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped cleanly without it")
    config.addinivalue_line("markers", "slow: longer CPU tests (still part of the default run)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.fixture(scope="session")
def t5_checkpoint(tmp_path_factory):
    """A tiny original-T5 (relu, tied, scaled decoder output) checkpoint saved with save_pretrained."""
    from saicl.testing import save_tiny_t5

    path = tmp_path_factory.mktemp("t5-relu")
    save_tiny_t5(path, gated=False, seed=0)
    return path


@pytest.fixture(scope="session")
def t5_v1_1_checkpoint(tmp_path_factory):
    """A tiny t5-v1_1-style (gated-gelu, untied head) checkpoint."""
    from saicl.testing import save_tiny_t5

    path = tmp_path_factory.mktemp("t5-gated")
    save_tiny_t5(path, gated=True, seed=1)
    return path


@pytest.fixture(scope="session")
def episodes():
    return [
        {"demonstrations": [("the cat sat", "animal"), ("bright red", "color"), ("a dog", "animal")],
         "query": "deep blue"},
        {"demonstrations": [("x", "y")], "query": "what follows x?"},
        {"demonstrations": [], "query": "no demonstrations here"},
        {"demonstrations": [("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5")],
         "query": "six"},
    ]
