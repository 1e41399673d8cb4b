import os
import sys
import random

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import VARIANTS, save_tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """name -> path of a saved tiny HF checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = save_tiny_model(name, str(root / name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in (37, 5, 61, 23)]


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    # GGUF conversions go to one session-wide cache, never the user's home
    monkeypatch.setenv("PDCLI_CACHE_DIR", os.environ.get("PDCLI_TEST_CACHE_DIR") or str(tmp_path_factory.getbasetemp() / "cache"))


def assert_pool_full(llm):
    engine = llm.engine
    assert engine.num_free_blocks() == engine.runner.num_blocks, "KV blocks leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting
