"""Classify images from an autoencoder's code: its encoder (pretrained and frozen, fine-tuned, or fresh) plus a head."""

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from autoencoders.errors import UserError
from autoencoders.models import AE, SplitSteps
from autoencoders.nets import build_nets

HEADS = ("linear", "mlp")
SPLITS = ("train", "val", "test")


class Classifier(SplitSteps):
    """An encoder (the architecture of an AE's, `latent_dim` outputs) and a `linear` or `mlp` head on its code.

    With `encoder_ckpt` (a checkpoint of any AE or VAE run) the encoder starts from that autoencoder's encoder and
    stays frozen: no gradients, eval mode. `finetune=True` trains it too, at `encoder_lr`. Without `encoder_ckpt` the
    same architecture trains from scratch at `lr`: the baseline.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        encoder_ckpt: str | Path | None = None,
        latent_dim: int = 16,
        arch: str = "conv",
        widths: Sequence[int] | None = None,
        head: str = "mlp",
        head_width: int = 128,
        finetune: bool = False,
        lr: float = 1e-3,
        encoder_lr: float = 1e-4,
    ):
        super().__init__()
        if head not in HEADS:
            raise UserError(f"model.head={head!r} is unknown. Use one of: {', '.join(HEADS)}.")
        # The pretrained weights end up in this module's own checkpoints, so rebuilding one (autoencoders.load)
        # must not need the autoencoder's file: encoder_ckpt is no hyperparameter (the run's config records it).
        self.save_hyperparameters(ignore=["encoder_ckpt"], logger=False)
        self.pretrained = encoder_ckpt is not None
        self.frozen = self.pretrained and not finetune
        self.encoder = build_nets(arch, image_shape, latent_dim, latent_dim, widths)[0]
        if self.pretrained:
            self.encoder.load_state_dict(pretrained_encoder_weights(encoder_ckpt, image_shape, self.encoder))
        self.encoder.requires_grad_(not self.frozen).train(not self.frozen)  # Lightning keeps modules' modes
        if head == "linear":
            self.head = nn.Linear(latent_dim, num_classes)
        else:
            self.head = nn.Sequential(nn.Linear(latent_dim, head_width), nn.ReLU(), nn.Linear(head_width, num_classes))
        # nn.ModuleDict keys may not shadow Module attributes such as `train`, hence the suffix.
        self.accuracy = nn.ModuleDict(
            {f"{split}_acc": MulticlassAccuracy(num_classes, average="micro") for split in SPLITS}
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.head(self.encoder(x))

    def train(self, mode: bool = True) -> "Classifier":
        """Also `model.train()` leaves a frozen encoder in eval mode."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = self.accuracy[f"{split}_acc"]
        accuracy(logits, y)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, batch_size=len(x))
        self.log(f"{split}/acc", accuracy, on_step=on_step, on_epoch=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.head.parameters(), "lr": self.hparams.lr}]
        if not self.frozen:
            encoder_lr = self.hparams.encoder_lr if self.pretrained else self.hparams.lr
            groups.append({"params": self.encoder.parameters(), "lr": encoder_lr})
        return torch.optim.Adam(groups, fused=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autoencoders_class"] = type(self).__name__


def pretrained_encoder_weights(encoder_ckpt: str | Path, image_shape: Sequence[int], encoder: nn.Module) -> dict:
    """The encoder weights of an AE or VAE checkpoint, checked to fit the data's `image_shape` and `encoder`.

    A VAE's encoder outputs (mean, log-variance); the code is the mean (VAE.posterior takes the first half), so only
    the output layer's rows for the mean are kept and the encoder becomes an AE-shaped one, like the baseline's.
    """
    from autoencoders.checkpoints import MODEL_CLASSES, read_checkpoint  # checkpoints.py imports this module

    ckpt = read_checkpoint(encoder_ckpt)
    kind, hp = ckpt["autoencoders_class"], ckpt["hyper_parameters"]
    if not issubclass(MODEL_CLASSES[kind], AE):
        raise UserError(
            f"encoder_ckpt={str(encoder_ckpt)!r} is a {kind} checkpoint, not an autoencoder's. Pass the checkpoint "
            "of a model=ae, conv_ae, vae or conv_vae run (e.g. <run_dir>/checkpoints/last.ckpt); to continue "
            "training a classifier, resume it with ckpt_path=... instead."
        )
    if tuple(hp["image_shape"]) != tuple(image_shape):
        raise UserError(
            f"encoder_ckpt={str(encoder_ckpt)!r} was trained on images of shape {tuple(hp['image_shape'])} "
            f"(channels, height, width), but the data's images are {tuple(image_shape)}. Train the classifier on "
            "the data the autoencoder was trained on (same data=...), or pretrain an autoencoder on this data."
        )
    weights = {k.removeprefix("encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    if MODEL_CLASSES[kind].code_multiplier > 1:
        *_, out_weight, out_bias = weights  # the output layer comes last in both nets.py encoders
        weights[out_weight], weights[out_bias] = (weights[k][: hp["latent_dim"]] for k in (out_weight, out_bias))
    expected = {k: v.shape for k, v in encoder.state_dict().items()}
    if {k: v.shape for k, v in weights.items()} != expected:
        raise UserError(
            f"encoder_ckpt={str(encoder_ckpt)!r} holds an encoder with arch={hp['arch']}, widths={hp['widths']} "
            f"and latent_dim={hp['latent_dim']}, which does not fit the classifier's encoder. Pass "
            f"latent_dim={hp['latent_dim']} model.arch={hp['arch']} model.widths={_override_value(hp['widths'])}: "
            "these keys describe the classifier's encoder, the from-scratch baseline's too."
        )
    return weights


def _override_value(widths: Sequence[int] | None) -> str:
    return "null" if widths is None else f"[{','.join(map(str, widths))}]"
