"""Fixtures for the data-pipeline tests: the shared web pages (../shared/data, skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shared_data as shared  # noqa: F401  (re-exported for the test modules)


@pytest.fixture
def web_html() -> Path:
    return shared("web_html")
