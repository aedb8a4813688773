"""Fixtures for the data-pipeline tests: the shared web pages and evaluation sets, when present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (these tests need ../shared/data)")
    return p


@pytest.fixture
def web_html() -> Path:
    return shared("web_html")
