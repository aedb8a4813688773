"""Fixtures for the generation tests."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import ARCHS

from lmforge.tokenizer.byte import ByteTokenizer


# tiny models: one thread avoids oversubscribing shared CPUs (20x faster here than 2 threads)
torch.set_num_threads(1)


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()
