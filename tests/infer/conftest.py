"""Fixtures for the generation tests."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import ARCHS

from lmforge.tokenizer.byte import ByteTokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run ~20x faster on one thread than on two contended ones; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()
