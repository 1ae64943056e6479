"""+callbacks=probe: val/probe_acc, a k-NN vote among a few labelled training codes, while an autoencoder trains."""

import json
import os
from pathlib import Path

import pytest
import torch

import autoencoders
from autoencoders.data import ImageDataModule, MNISTSubset
from tests.helpers import knn_accuracy, run_train


def test_the_probe_logs_the_knn_accuracy_of_the_validation_codes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train("+callbacks=probe", "data.binarize=static", "latent_dim=4", "data.probe_labels_per_class=5",
              "trainer.limit_val_batches=null", f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    probe_acc = json.loads((run / "metrics.json").read_text())["val/probe_acc"]
    dm = ImageDataModule(MNISTSubset(os.environ["AUTOENCODERS_CACHE"]), binarize="static", probe_labels_per_class=5)
    dm.setup()
    images, labels = dm.probe_split()
    assert len(labels) == 50 and labels.bincount().tolist() == [5] * 10
    model = autoencoders.load(run / "checkpoints" / "last.ckpt")  # one epoch: the weights that were validated
    with torch.no_grad():
        bank, codes = model.encode(images).tolist(), model.encode(dm.inputs("val")).tolist()
    expected = knn_accuracy(bank, labels.tolist(), codes, dm.val_set.labels.tolist(), k=10)
    assert probe_acc == pytest.approx(expected, abs=1e-6) and probe_acc > 0.1
