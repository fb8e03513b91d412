import os

import pytest
import torch

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
