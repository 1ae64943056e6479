"""Loading checkpoints safely (weights_only=True: tensors and plain containers, no arbitrary code)."""

import pickle
import zipfile
from pathlib import Path

import lightning as L
import torch

from autoencoders.classifier import Classifier
from autoencoders.errors import UserError
from autoencoders.models import AE, VAE

MODEL_CLASSES: dict[str, type[L.LightningModule]] = {"AE": AE, "VAE": VAE, "Classifier": Classifier}


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, or a UserError saying why the file is not a usable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"Checkpoint {str(path)!r} does not exist. "
            "Pass the path of a .ckpt file, e.g. <run_dir>/checkpoints/last.ckpt."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "It may be truncated by an interrupted copy or not be a checkpoint at all; use another .ckpt file."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("autoencoders_class") not in MODEL_CLASSES:
        raise UserError(
            f"{str(path)!r} is not a checkpoint written by this project's train.py (no known 'autoencoders_class'). "
            f"Use a checkpoint of one of: {', '.join(MODEL_CLASSES)}."
        )
    return ckpt


def check_fits(ckpt: dict, model: L.LightningModule, path: str | Path) -> None:
    """Raise a UserError unless `ckpt` (from read_checkpoint) holds weights of `model`'s class and shapes."""
    kind = ckpt["autoencoders_class"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if kind == type(model).__name__ and shapes == {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}:
        return
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in ckpt["hyper_parameters"].items()}
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in model.hparams.items()}
    differ = [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in ours.items() if saved.get(k, v) != v]
    raise UserError(
        f"{str(path)!r} holds a {kind} whose weights do not fit this run's {type(model).__name__}"
        + (f": it was trained with {', '.join(differ)}" if differ else "")
        + ". Use the model and data settings it was trained with (its run's .hydra/config.yaml), or ckpt_path=null "
        "to start from scratch."
    )


def load(path: str | Path) -> L.LightningModule:
    """Rebuild the right LightningModule for any checkpoint written by train.py, in eval mode on the CPU."""
    ckpt = read_checkpoint(path)
    model = MODEL_CLASSES[ckpt["autoencoders_class"]](**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
