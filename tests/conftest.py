"""Shared test fixtures: where ../shared/data is, and deterministic torch settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton kernels (lmforge/kernels) run in Triton's CPU interpreter when there is no GPU; the switch is
# read when a kernel is defined, so it must be set before lmforge.kernels is first imported
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (tests that need ../shared/data skip without it)")
    return p


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
