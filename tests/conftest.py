import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RANKSERVE_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    from adapters_store.basemodels import load_base

    return load_base("tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert():
    from adapters_store.basemodels import load_base

    return load_base("tiny-bert")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from tests.seaweed import seaweed  # noqa: E402, F401  (the session's real S3 server, for the object-store tests)
