"""Fixtures for the batch-job tests (plain helpers live in job_helpers.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llama_dir(tiny_model) -> str:
    return tiny_model("llama")
