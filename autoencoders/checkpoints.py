"""Loading checkpoints safely (weights_only=True: tensors and plain containers, no arbitrary code)."""

import pickle
import zipfile
from pathlib import Path

import lightning as L
import torch

from autoencoders.errors import UserError
from autoencoders.models import AE, VAE

MODEL_CLASSES: dict[str, type[L.LightningModule]] = {"AE": AE, "VAE": VAE}


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


def load(path: str | Path) -> L.LightningModule:
    """Rebuild the right LightningModule for any checkpoint written by train.py, in eval mode on the CPU."""
    ckpt = read_checkpoint(path)
    model = MODEL_CLASSES[ckpt["autoencoders_class"]](**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
