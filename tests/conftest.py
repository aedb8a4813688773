"""Shared test fixtures: where ../shared/data is, and deterministic torch settings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Triton kernels (lmforge/kernels) run in Triton's CPU interpreter when there is no GPU; the switch is
# read when a kernel is defined, so it must be set before lmforge.kernels is first imported
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# checksums lmforge.checkpoint remembers and the tokenizer fast-path checks lmforge.tokenizer.agreement passed go
# to fresh directories, not the user's ~/.cache
os.environ.setdefault("LMFORGE_HASH_CACHE", tempfile.mkdtemp(prefix="lmforge-sha256-"))
os.environ.setdefault("LMFORGE_TOKENIZER_CACHE", tempfile.mkdtemp(prefix="lmforge-bpe-agreement-"))


def pytest_configure(config):
    """Define every Triton kernel now, under the switch above: tests that set TRITON_INTERPRET=0 for a moment
    (checking the no-Triton fallbacks) must not be the first to import a kernel module, or its kernels stay
    compiled-only ("0 active drivers") for the rest of the run."""
    import importlib
    import importlib.util
    import pkgutil

    if importlib.util.find_spec("triton") is None:
        return
    import lmforge.kernels

    for mod in pkgutil.iter_modules(lmforge.kernels.__path__):
        importlib.import_module(f"lmforge.kernels.{mod.name}")


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
