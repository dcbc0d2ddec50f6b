"""Shared pytest fixtures for nanoschnack.

The Triton interpreter must be switched on before the first `@triton.jit`
is imported, so it is set here, at the very top, before any project import.
It lets the kernel tests run Triton kernels on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def sample_data_dir() -> Path:
    """Where the German sample data lives: $NANOSCHNACK_DATA or ../shared/data."""
    return Path(os.environ.get("NANOSCHNACK_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The sample-data folder; skips the test with the reason when it is absent."""
    path = sample_data_dir()
    if not (path / "pretrain").is_dir():
        pytest.skip(f"sample data not found at {path} (set NANOSCHNACK_DATA to the folder holding pretrain/, sft/, eval/)")
    return path
