"""Every test, and every train.py or evaluate.py it starts, caches data and FID feature nets in a temporary folder of
this session, never in the user's ~/.cache; so does wandb, with its settings and staging files.

They also run torch on one thread (OMP_NUM_THREADS=1; a test of thread counts sets its own): two pytest-xdist workers,
each with as many threads as cores, oversubscribe the machine (on 2 cores the suite took 4 min 18 s with one thread,
5 min 55 s without)."""

import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any test module imports torch
    os.environ["AUTOENCODERS_CACHE"] = cache = tempfile.mkdtemp(prefix="autoencoders-test-cache-")
    for folder in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[folder] = os.path.join(cache, folder.lower())


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop("AUTOENCODERS_CACHE"), ignore_errors=True)
    for folder in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ.pop(folder)


@pytest.fixture(autouse=True)
def no_hydra_config_left_behind():
    """A test that composes a config as train.py's (tests/helpers.py compose_train) registers it as Hydra's current
    one; the next test in the process must not read its choices (evaluate.py names data by them)."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
