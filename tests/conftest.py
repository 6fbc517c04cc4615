"""
Shared pytest fixtures: a tiny tokenizer trained on text every Python install has, a temporary
NANOCHAT_BASE_DIR, and the path to ../shared/data (tests that need it skip when it is absent).
"""

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

torch.set_num_threads(min(2, torch.get_num_threads()))


def stdlib_texts(limit_chars=400_000):
    """The language-reference topics shipped with every CPython (pydoc_data), up to limit_chars."""
    from pydoc_data.topics import topics
    out, n = [], 0
    for key in sorted(topics):
        out.append(topics[key])
        n += len(topics[key])
        if n >= limit_chars:
            break
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(stdlib_texts()), vocab_size=512)


@pytest.fixture()
def base_dir(tmp_path, monkeypatch):
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
