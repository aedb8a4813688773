"""Fixtures for the generation tests."""

from __future__ import annotations

import pytest
from infer_helpers import ARCHS

from lmforge.tokenizer.byte import ByteTokenizer


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()
