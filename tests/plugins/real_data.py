"""Real third-party preference data in tests: read where `hf_ches.testing.real_data` finds it, skipped with the
reason where it is absent (a checkout without the shared data folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from hf_ches.testing import real_data


def real_file(name: str) -> Path:
    """``real_data(name)``, or skip the test saying where the file was looked for."""
    try:
        return real_data(name)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))


def real_rows(name: str) -> Dataset:
    """The rows of a real JSON or JSON-lines file, as ``load_dataset("json", data_files=...)`` reads them."""
    return load_dataset("json", data_files=str(real_file(name)), split="train")
