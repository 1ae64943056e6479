"""Every test, and every train.py or evaluate.py it starts, caches data and FID feature nets in a temporary folder of
this session, never in the user's ~/.cache."""

import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    os.environ["AUTOENCODERS_CACHE"] = tempfile.mkdtemp(prefix="autoencoders-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop("AUTOENCODERS_CACHE"), ignore_errors=True)
