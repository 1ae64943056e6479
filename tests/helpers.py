import hashlib
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import hparams_plugin
from werkzeug.test import Client

ROOT = Path(__file__).resolve().parents[1]


def in_browser(check_page: Path) -> object:
    """Open `check_page` in headless Chromium, let its scripts run, and return the JSON they wrote into its
    `<pre id="out">` (a check page frames the pages under test and reports what it finds in them)."""
    command = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
               "--virtual-time-budget=10000", "--dump-dom", check_page.as_uri()]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    return json.loads(html.unescape(re.search(r'<pre id="out">([^<]*)</pre>', dom).group(1)))


TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
]

# where a signal's stop lands inside an import that turns it into an ImportError (tests/stopped_import.py): the
# overrides and environment that put the import there, and the file it writes in the working dir once it waits
STOPPED_IMPORTS = {
    "train.py's imports": ([], {"STOPPED_IMPORT_IN": "autoencoders.training"}),
    "an import check that swallows the error": (
        [],
        {"STOPPED_IMPORT_IN": "autoencoders.training", "STOPPED_IMPORT_SWALLOWED": "1"},
    ),
    "setting up training": (["+callbacks.stopped_import._target_=tests.stopped_import.Callback"], {}),
}
STOPPED_IMPORT_PATH = {  # before any PYTHONPATH of the caller's (an empty entry would add the working dir)
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "site"), str(ROOT), os.environ.get("PYTHONPATH")]))
}
STOPPED_IMPORT_WAITING = "waiting-in-an-import"  # tests/stopped_import.py's WAITING (importing it would wait)


def run_script(
    script: str, *overrides: str, cwd: Path, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run train.py / evaluate.py as a user would, in a subprocess; on failure show its output."""
    command = [sys.executable, str(ROOT / script), *overrides]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def run_train(
    *overrides: str, cwd: Path, check: bool = True, tiny: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # e.g. -m must precede the overrides
    rest = [o for o in overrides if not o.startswith("-")]
    return run_script("train.py", *flags, *(TINY if tiny else []), *rest, cwd=cwd, check=check, timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def metrics(run_dir: Path) -> dict[str, float]:
    """A run's metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())


def compose_train(run_dir: Path, *overrides: str) -> DictConfig:
    """What `python train.py <overrides>` composes, registered as Hydra's current run writing to `run_dir`: for
    calling training.train in the test process."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"hydra.runtime.output_dir={run_dir}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def knn_accuracy(
    bank: list[list[float]], bank_labels: list[int], codes: list[list[float]], labels: list[int], k: int
) -> float:
    """A cosine k-NN vote, weighted by the non-negative similarities, by brute force in Python floats: the accuracy
    of `codes` against `labels`, voting among `bank` (ten classes)."""

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    correct = 0
    for code, label in zip(codes, labels, strict=True):
        nearest = sorted(((cosine(code, other), y) for other, y in zip(bank, bank_labels, strict=True)), reverse=True)
        votes = [sum(max(s, 0) for s, y in nearest[:k] if y == c) for c in range(10)]
        correct += votes.index(max(votes)) == label
    return correct / len(codes)


def hparams_plugin_route(logdir: Path, route: str, request: dict) -> dict:
    """What TensorBoard's hparams plugin answers the browser for `logdir`, loaded by TensorBoard's own code."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    context = base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
    )  # fmt: skip
    app = hparams_plugin.HParamsPlugin(context).get_plugin_apps()[route]
    response = Client(app).post(route, json={"experimentName": "", **request})
    assert response.status_code == 200
    return json.loads(response.get_data())


def checkpoint_file(model: L.LightningModule, path: Path) -> Path:
    """`model`, untrained, saved as train.py's checkpoints record it: its class, hyperparameters and weights."""
    record = {"autoencoders_class": type(model).__name__, "hyper_parameters": dict(model.hparams)}
    torch.save(record | {"state_dict": model.state_dict()}, path)
    return path
