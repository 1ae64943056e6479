"""Classify images from an autoencoder's code (pretrained, frozen or fine-tuned), or from the baselines a reviewer
asks for (the same encoder from scratch or at random, and raw pixels), with a small head."""

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.checkpoints import MODELS, read_checkpoint
from autoencoders.data import ImageDataModule
from autoencoders.errors import UserError
from autoencoders.models.ae import AE
from autoencoders.models.base import EpochMeanLogging, SplitSteps
from autoencoders.models.vae import VAE
from autoencoders.nets import build_nets
from autoencoders.optim import OptimizerFactory
from autoencoders.probes import knn_vote

# How the classifier gets the features its head reads (model.method; config.ClassifierConfig lists them): the
# pretrained encoder frozen or fine-tuned, the same encoder trained from scratch, a frozen encoder at its random
# initialisation, or the raw pixels; and two probes of the frozen pretrained code: a logistic regression (`linear`, a
# linear head) and a cosine k-nearest-neighbour vote (`knn`). These read a pretrained encoder:
PRETRAINED = ("frozen", "finetune", "linear", "knn")


class Classifier(EpochMeanLogging, SplitSteps):
    """A head (`linear` or `mlp`) on features chosen by `method` (see PRETRAINED); null: `frozen` with an
    `encoder_ckpt` (a checkpoint of any autoencoder run but M2's, `check_encoder_kind`), `scratch` without. The encoder
    has the architecture of an AE's, with `latent_dim` outputs; with `encoder_ckpt`, a null `latent_dim`, `arch` or
    `widths` is the checkpoint's, and another value is an error that names it. A frozen encoder gets no gradients and
    stays in eval mode; `finetune` trains the pretrained one at `encoder_lr`, `scratch` a fresh one at the optimizer's
    learning rate. The probes of the frozen pretrained code: `linear` is a logistic regression (a linear head, whatever
    `head`), `knn` has no head and no optimizer: its one training epoch stores the labelled images' codes (under DDP,
    every process's), and an image's class is the vote of its `knn_k` most cosine-similar ones, weighted by similarity
    (it then stops, whatever the trainer's schedule).

    Training refuses an `encoder_ckpt` whose autoencoder trained on any of the data's validation or test images.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        encoder_ckpt: str | Path | None = None,
        method: str | None = None,
        latent_dim: int | None = None,
        arch: str | None = None,
        widths: Sequence[int] | None = None,
        head: str = "mlp",
        head_width: int = 128,
        encoder_lr: float = 1e-4,
        knn_k: int = 10,
        optimizer: OptimizerFactory | None = None,
        scheduler: dict[str, Any] | None = None,
    ):
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        method = method or ("frozen" if encoder_ckpt is not None else "scratch")
        if encoder_ckpt is not None and method not in PRETRAINED:
            raise UserError(
                f"model.method={method} trains no pretrained encoder, but encoder_ckpt={encoder_ckpt} is given. "
                "Use method frozen or finetune with encoder_ckpt, or drop encoder_ckpt."
            )
        pretrained = read_checkpoint(encoder_ckpt) if encoder_ckpt is not None else None
        if pretrained is not None:
            latent_dim, arch, widths = encoder_settings(pretrained, encoder_ckpt, latent_dim, arch, widths)
        latent_dim, arch = latent_dim or 16, arch or "mlp"
        # The pretrained weights end up in this module's own checkpoints, so rebuilding one (autoencoders.load)
        # must not need the autoencoder's file: encoder_ckpt is no hyperparameter (the run's config records it).
        self.save_hyperparameters(ignore=["encoder_ckpt", "optimizer", "scheduler"], logger=False)
        self.method, self.encoder_ckpt = method, encoder_ckpt
        self.frozen = method not in ("finetune", "scratch")
        self.pretraining_data: dict | None = None  # the autoencoder's training split, for the leak check
        if method == "pixels":
            self.encoder, features = nn.Flatten(), math.prod(image_shape)
        else:
            self.encoder, features = build_nets(arch, image_shape, latent_dim, latent_dim, widths)[0], latent_dim
        if pretrained is not None:
            self.encoder.load_state_dict(pretrained_encoder(pretrained, encoder_ckpt, image_shape, self.encoder))
            self.pretraining_data = pretrained.get(ImageDataModule.__qualname__)
        # Lightning keeps modules' modes. knn trains nothing, but DDP wraps only a module with a parameter that takes
        # gradients: its encoder's take zero ones under DDP (_step), and none on one process
        self.encoder.requires_grad_(not self.frozen or method == "knn").train(not self.frozen)
        self.example_input_array = torch.zeros(1, *image_shape)  # the model summary's FLOPs per image
        if method == "knn":  # the labelled training codes and their labels, filled by the one training epoch
            self.head = None
            self.register_buffer("bank_codes", torch.empty(0, features))
            self.register_buffer("bank_labels", torch.empty(0, dtype=torch.long))
        elif head == "linear" or method == "linear":
            self.head = nn.Linear(features, num_classes)
        else:
            self.head = nn.Sequential(nn.Linear(features, head_width), nn.ReLU(), nn.Linear(head_width, num_classes))

    def setup(self, stage: str) -> None:
        """Before training: knn needs as many labelled images as neighbours vote, a pretrained method needs its
        encoder, and that encoder must not have seen the held-out images."""
        super().setup(stage)
        if stage == "fit" and self.method == "knn":  # it stores codes: no optimizer and no loss, by design
            returned_none = r"`(LightningModule.configure_optimizers|training_step)` returned `None`"
            warnings.filterwarnings("ignore", message=returned_none)
            labelled, k = len(self.trainer.datamodule.train_set), self.hparams.knn_k
            if k > labelled:
                raise UserError(
                    f"model.knn_k={k} neighbours would vote, but the k-NN bank holds only the {labelled} labelled "
                    f"training images. Use model.knn_k={labelled} or fewer (e.g. model.knn_k={min(10, labelled)}), "
                    "or more labelled images (data.labels_per_class)."
                )
        if stage != "fit" or self.method not in PRETRAINED:
            return
        if self.encoder_ckpt is None:
            raise UserError(
                f"model.method={self.method} needs a pretrained encoder: pass encoder_ckpt=<an AE or VAE run>"
                "/checkpoints/last.ckpt, or use method scratch, random or pixels."
            )
        check_held_out(self.pretraining_data, self.trainer.datamodule, self.encoder_ckpt)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits; for `knn`, the log of the neighbours' similarity-weighted vote shares."""
        if self.method == "knn":
            hp = self.hparams
            votes = knn_vote(self.encoder(x), self.bank_codes, self.bank_labels, hp.knn_k, hp.num_classes)
            return votes.clamp_min(1e-6).log()
        return self.head(self.encoder(x))

    def configure_optimizers(self):
        return None if self.method == "knn" else super().configure_optimizers()

    def on_train_epoch_start(self) -> None:
        if self.method == "knn":  # this process's labelled codes and labels, until the bank gathers every process's
            self.bank_share: list[tuple[Tensor, Tensor]] = []

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.method == "knn":  # one pass over the labelled images stored them all: nothing more to learn
            self.trainer.should_stop = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("bank_codes", "bank_labels"):  # a knn checkpoint's bank has its own number of images
            if hasattr(self, name) and prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> "Classifier":
        """Also `model.train()` leaves a frozen encoder in eval mode."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor | None:
        x, y = batch
        if self.method == "knn" and split == "train":  # store the batch's codes
            with torch.no_grad():
                self.bank_share.append((self.encoder(x), y))
            if self.trainer.is_last_batch:  # the bank of every process's share (DDP copies buffers from process 0)
                codes, labels = (torch.cat(t) for t in zip(*self.bank_share, strict=True))
                self.bank_codes = self.all_gather(codes).flatten(0, -2)
                self.bank_labels = self.all_gather(labels).flatten()
            if self.trainer.world_size == 1:
                return None
            # under DDP, a loss of zero gradients: Lightning's DDP refuses a step without one (no optimizer applies it)
            return 0 * sum(p.sum() for p in self.encoder.parameters())
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.track(split, {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}, len(x))
        return loss

    def parameter_groups(self) -> list[dict]:
        """The head, and a trained encoder: at the optimizer's learning rate, a fine-tuned one at `encoder_lr`."""
        groups = [{"params": self.head.parameters()}]
        if self.method == "finetune":
            groups.append({"params": self.encoder.parameters(), "lr": self.hparams.encoder_lr})
        elif not self.frozen:
            groups.append({"params": self.encoder.parameters()})
        return groups


def check_held_out(pretraining_data: dict | None, datamodule: ImageDataModule, encoder_ckpt: str | Path) -> None:
    """Refuse an encoder whose autoencoder trained on any validation or test image of `datamodule` (set up)."""
    if pretraining_data is None or "train_index" not in pretraining_data:
        raise UserError(
            f"encoder_ckpt={str(encoder_ckpt)!r} does not record which images its autoencoder trained on (it was "
            "written by an older version), so the classifier's validation and test images cannot be checked to be "
            "unseen. Pretrain the autoencoder again with this version."
        )
    leaked = datamodule.held_out_overlap(pretraining_data)
    if leaked:
        raise UserError(
            f"The autoencoder of encoder_ckpt={str(encoder_ckpt)!r} trained on {leaked} of the classifier's "
            "validation and test images, so its scores would not be on unseen data. Its run used another split: "
            "train the classifier with the autoencoder's data.split_seed and fractions, or pretrain on this split."
        )


def check_encoder_kind(ckpt: dict, path: str | Path, m1m2: bool = False) -> None:
    """Refuse an encoder_ckpt (read_checkpoint) whose code a classifier, or with `m1m2` M1+M2, cannot read: a
    classifier reads any autoencoder's encoder, M1+M2 any VAE's posterior. Neither reads M2's, whose code [z, one-hot
    y] needs its classifier q(y|x) beside its encoder."""
    kind = ckpt["autoencoders_class"]
    model = MODELS[kind]
    if getattr(model, "semi_supervised", False):
        raise UserError(
            f"encoder_ckpt={str(path)!r} is a semi-supervised {kind} checkpoint: its code [z, one-hot y] needs its "
            "classifier q(y|x) beside its encoder, so its encoder alone gives no code to read. Pass a VAE run's "
            "checkpoint (model=vae, ...); M2's own classifier is scored in its run's metrics.json (test/acc)."
        )
    if m1m2 and not issubclass(model, VAE):
        raise UserError(
            f"encoder_ckpt={str(path)!r} is a {kind} checkpoint; M1+M2 needs a VAE's (model=vae, conv_vae, or another "
            "VAE of the zoo), whose posterior gives M2 its codes. Pretrain one with model=vae, or drop encoder_ckpt "
            "for M2."
        )
    if not issubclass(model, AE):
        raise UserError(
            f"encoder_ckpt={str(path)!r} is a {kind} checkpoint, not an autoencoder's. Pass the checkpoint "
            "of an autoencoder run (model=ae, vae, ...; e.g. <run_dir>/checkpoints/last.ckpt); to continue "
            "training a classifier, resume it with ckpt_path=... instead."
        )


def encoder_settings(
    ckpt: dict, path: str | Path, latent_dim: int | None, arch: str | None, widths: Sequence[int] | None
) -> tuple[int, str, Sequence[int] | None]:
    """The encoder's latent_dim, arch and widths of an autoencoder checkpoint (read_checkpoint), for a classifier
    that was given these values (None: take the checkpoint's); a given value that differs is an error."""
    check_encoder_kind(ckpt, path)
    hp = ckpt["hyper_parameters"]
    given = {"latent_dim": latent_dim, "arch": arch, "widths": None if widths is None else list(widths)}
    saved = {key: hp[key] if key != "widths" or hp[key] is None else list(hp[key]) for key in given}
    differ = [f"model.{k}={_override_value(v)} (the checkpoint's: {_override_value(saved[k])})"
              for k, v in given.items() if v is not None and v != saved[k]]  # fmt: skip
    if differ:
        raise UserError(
            f"encoder_ckpt={str(path)!r} holds an encoder that differs from the classifier's settings: "
            f"{', '.join(differ)}. Drop those settings: with encoder_ckpt, the classifier's encoder is the "
            "checkpoint's."
        )
    return saved["latent_dim"], saved["arch"], saved["widths"]


def pretrained_encoder(ckpt: dict, path: str | Path, image_shape: Sequence[int], encoder: nn.Module) -> dict:
    """The encoder weights of an autoencoder checkpoint (read_checkpoint), checked to fit the data's `image_shape`
    and `encoder`.

    A VAE's encoder outputs (mean, log-variance); the code is the mean (VAE.posterior takes the first half), so only
    the output layer's rows for the mean are kept and the encoder becomes an AE-shaped one, like the baseline's.
    """
    kind, hp = ckpt["autoencoders_class"], ckpt["hyper_parameters"]
    if tuple(hp["image_shape"]) != tuple(image_shape):
        raise UserError(
            f"encoder_ckpt={str(path)!r} was trained on images of shape {tuple(hp['image_shape'])} "
            f"(channels, height, width), but the data's images are {tuple(image_shape)}. Train the classifier on "
            "the data the autoencoder was trained on (same data=...), or pretrain an autoencoder on this data."
        )
    weights = {k.removeprefix("encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    if MODELS[kind].code_multiplier > 1:
        *_, out_weight, out_bias = weights  # the output layer comes last in both nets.py encoders
        weights[out_weight], weights[out_bias] = (weights[k][: hp["latent_dim"]] for k in (out_weight, out_bias))
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in encoder.state_dict().items()}:
        raise UserError(f"encoder_ckpt={str(path)!r} holds encoder weights that do not fit its own settings {hp}.")
    return weights


def _override_value(value: object) -> str:
    """`value` as a command line would give it: null, [16,32], conv."""
    if value is None:
        return "null"
    return f"[{','.join(map(str, value))}]" if isinstance(value, list | tuple) else str(value)
