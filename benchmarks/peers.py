"""Against pythae: the same MLP VAE, data, epochs and batch size through pythae's TrainingPipeline and train.py's path.

Both train pythae's default MNIST VAE (Encoder_VAE_MLP and Decoder_AE_MLP: 784-512-ReLU to the mean and log-variance
of a 16-d Gaussian code, 16-512-ReLU-784 to Bernoulli probabilities). Ours is that net with model.widths=[512]: our
encoder's last layer, 512 -> 32, is pythae's two 512 -> 16 heads side by side, and our decoder outputs the logits
whose sigmoid pythae's outputs. Both start from the same initial weights (ours, copied into pythae's net) and
minimise the same loss (Bernoulli NLL summed over pixels plus the analytic KL, mean over the batch: pythae's
reconstruction_loss="bce") with the same fused Adam (lr 1e-3), batch size 128 and number of epochs, on the same
tensors: the statically binarised train split of the bundled 5,000 MNIST digits (data.binarize=static: train.py's
default draws fresh binary images every epoch, which pythae's tensor input has no counterpart of), with the val split
as pythae's eval data, since train.py validates every epoch. Each
keeps the epoch with the best validation loss (pythae in memory, saved at the end; ours held in memory too and
written as best-epochNNN.ckpt with last.ckpt, on train.py's time budget, beside the TensorBoard logs and image grids).

s/epoch is the wall time of a fit over its epochs: the TrainingPipeline call (pythae's data checks, set-up, sanity
forward pass, training, validation and final save), and the `trainer.fit` of train.py's `train` (sanity check,
training, validation, checkpoints; the data module, model and Trainer are built before it, the test runs after it).
Each seed gives both pipelines the same initial weights and binarised images, and one run each, taking turns in
alternating order in one process; pythae/this is pythae's s/epoch over ours in the same seed's turn (the worst seed
and the median are shown), and `this - pythae` the paired difference of test ELBOs, with its standard error over
seeds.

Each best model is then scored here, by neither framework's code: on the binarised test split, the ELBO (nats per
image: log p(x|z) averaged over `--samples` draws of z, minus the analytic KL) and the importance-weighted bound
from the same draws, which are the same for both models.

    pip install -e ".[bench]"
    python benchmarks/peers.py [--epochs 20] [--seeds 0 1 2 3 4] [--threads N] [--samples 100] [--json FILE] [--quick]
                               [train.py overrides for both, e.g. trainer=gpu]
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from pythae.models import VAE as PythaeVAE
from pythae.models import AutoModel, VAEConfig
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig
from torch import Tensor
from torch.distributions import Normal, kl_divergence
from train_speed import compose_config, peak_gpu_memory

from autoencoders import load
from autoencoders.data import ImageDataModule
from autoencoders.models import VAE
from autoencoders.training import build, train

LR = 1e-3
OVERRIDES = [
    "model=vae", "model.widths=[512]", "latent_dim=16", "data.binarize=static", "data.batch_size=128",
    f"optimizer.lr={LR}", "optimizer.fused=true",
]  # fmt: skip
PIPELINES = ("pythae", "train.py")

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]  # images -> mean and log-variance of q(z|x)
Decoder = Callable[[Tensor], Tensor]  # codes -> Bernoulli logits of p(x|z), the shape of the images


class FitTimer(L.Callback):
    """Wall time of `trainer.fit`: from its setup to its end, so the sanity check and the last save count."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def initial_model(overrides: list[str], run_dir: Path) -> tuple[ImageDataModule, VAE]:
    """The data module and the freshly seeded VAE that train.py builds for `overrides`."""
    cfg = compose_config(overrides, run_dir)
    L.seed_everything(cfg.seed, verbose=False)
    return build(cfg)


def pythae_weights(ours: VAE) -> dict[str, Tensor]:
    """Our MLP VAE's weights under the names of pythae's default MLP; its state dict rejects any other net."""
    hidden, heads = ours.encoder[1], ours.encoder[3]  # Flatten, Linear, ReLU, Linear (nets.MLPEncoder)
    (mean_w, log_var_w), (mean_b, log_var_b) = heads.weight.chunk(2), heads.bias.chunk(2)
    layers = {
        "encoder.layers.0.0": (hidden.weight, hidden.bias),
        "encoder.embedding": (mean_w, mean_b),
        "encoder.log_var": (log_var_w, log_var_b),
        "decoder.layers.0.0": (ours.decoder[0].weight, ours.decoder[0].bias),
        "decoder.layers.1.0": (ours.decoder[2].weight, ours.decoder[2].bias),
    }
    return {
        f"{name}.{kind}": t.detach().clone()
        for name, pair in layers.items()
        for kind, t in zip(("weight", "bias"), pair, strict=True)
    }


def bernoulli_logits(p: Tensor) -> Tensor:
    """Logits whose Bernoulli log-probabilities are those pythae's BCE loss takes of the probabilities `p`: torch's
    binary_cross_entropy clamps each log at -100, so a saturated p of exactly 0 or 1 costs 100 nats when wrong."""
    return p.log().clamp(min=-100) - torch.log1p(-p).clamp(min=-100)


def run_pythae(
    datamodule: ImageDataModule, initial: VAE, epochs: int, out: Path, seed: int, cuda: bool
) -> tuple[float, tuple[Encoder, Decoder]]:
    """Fit seconds of pythae's TrainingPipeline on `datamodule`'s train and val images, from `initial`'s weights, and
    its best model as pythae saved it."""
    model_config = VAEConfig(input_dim=datamodule.image_shape, latent_dim=initial.latent_dim, reconstruction_loss="bce")
    model = PythaeVAE(model_config)
    model.load_state_dict(pythae_weights(initial))
    training_config = BaseTrainerConfig(
        output_dir=str(out),
        per_device_train_batch_size=datamodule.hparams.batch_size,
        per_device_eval_batch_size=datamodule.hparams.batch_size,
        num_epochs=epochs,
        learning_rate=LR,
        optimizer_params={"fused": True},
        seed=seed,
        no_cuda=not cuda,
    )
    pipeline = TrainingPipeline(model=model, training_config=training_config)
    start = time.perf_counter()
    pipeline(train_data=datamodule.inputs("train").cpu(), eval_data=datamodule.inputs("val").cpu())
    seconds = time.perf_counter() - start
    best = AutoModel.load_from_folder(os.path.join(pipeline.trainer.training_dir, "final_model")).eval()

    def encoder(x: Tensor) -> tuple[Tensor, Tensor]:
        code = best.encoder(x)
        return code.embedding, code.log_covariance

    return seconds, (encoder, lambda z: bernoulli_logits(best.decoder(z).reconstruction))


def run_ours(overrides: list[str], epochs: int, out: Path) -> tuple[float, tuple[Encoder, Decoder]]:
    """Fit seconds of train.py's `train`, and its best checkpoint (the one it tests and evaluate.py scores)."""
    timer = FitTimer()
    train(compose_config([*overrides, f"trainer.max_epochs={epochs}"], out), extra_callbacks=[timer])
    best = load(next((out / "checkpoints").glob("best-*.ckpt")))
    return timer.seconds, (best.posterior, best.decoder)


@torch.no_grad()
def test_bounds(
    encoder: Encoder, decoder: Decoder, x: Tensor, samples: int, batch_size: int = 128
) -> tuple[float, float]:
    """ELBO (log p(x|z) averaged over the draws, minus the analytic KL) and importance-weighted bound on log p(x),
    nats per image averaged over `x`, from `samples` draws of z ~ q(z|x) per image. The noise of the draws comes from
    a fixed seed, so two models are scored with the same noise."""
    generator = torch.Generator().manual_seed(0)
    elbo, iwae = [], []
    for batch in x.split(batch_size):
        mean, log_var = encoder(batch)
        q, prior = Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)
        z = mean + q.scale * torch.randn((samples, *mean.shape), generator=generator)  # (samples, B, latent)
        logits = decoder(z.flatten(0, 1)).view(samples, len(batch), -1)
        targets = batch.flatten(1).expand_as(logits)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
        log_w = log_px_z + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        elbo.append(log_px_z.mean(0) - kl_divergence(q, prior).sum(-1))
        iwae.append(torch.logsumexp(log_w, 0) - math.log(samples))
    return torch.cat(elbo).mean().item(), torch.cat(iwae).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run of each pipeline each")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both; default: torch's choice")
    parser.add_argument("--samples", type=int, default=100, help="draws of z per test image for the bounds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 seed, 10 samples")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both, e.g. trainer=gpu")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.samples = 1, args.seeds[:1], 10
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = "trainer=gpu" in args.overrides
    device = [] if any(o.startswith("trainer") for o in args.overrides) else ["trainer.accelerator=cpu"]
    runs: dict[str, dict[str, list[float]]] = {p: {"s/epoch": [], "test ELBO": [], "test IWAE": []} for p in PIPELINES}
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed epoch of each: what a process pays once (lazy imports, first kernels) is not timed
        datamodule, initial = initial_model([*OVERRIDES, *device, *args.overrides], Path(tmp) / "warm-up")
        run_pythae(datamodule, initial, 1, Path(tmp) / "warm-up" / "pythae", 0, cuda)
        run_ours([*OVERRIDES, *device, *args.overrides], 1, Path(tmp) / "warm-up" / "train.py")
        for i, seed in enumerate(args.seeds):
            # what both pipelines start from: the seed's initial weights and images; and everyone's test images
            overrides = [*OVERRIDES, f"seed={seed}", *device, *args.overrides]
            datamodule, initial = initial_model(overrides, Path(tmp) / f"seed-{seed}")
            for pipeline in PIPELINES[i % 2 :] + PIPELINES[: i % 2]:  # alternating order
                out = Path(tmp) / str(seed) / pipeline
                if pipeline == "pythae":
                    seconds, nets = run_pythae(datamodule, initial, args.epochs, out, seed, cuda)
                else:
                    seconds, nets = run_ours(overrides, args.epochs, out)
                elbo, iwae = test_bounds(*nets, datamodule.inputs("test").cpu(), args.samples)
                for name, value in (("s/epoch", seconds / args.epochs), ("test ELBO", elbo), ("test IWAE", iwae)):
                    runs[pipeline][name].append(value)

    ours, theirs = runs["train.py"], runs["pythae"]
    speedups = [t / o for t, o in zip(theirs["s/epoch"], ours["s/epoch"], strict=True)]  # seed by seed, same turn
    gaps = [o - t for o, t in zip(ours["test ELBO"], theirs["test ELBO"], strict=True)]
    results = {
        p: {
            "s/epoch (median)": statistics.median(runs[p]["s/epoch"]),
            "s/epoch (worst)": max(runs[p]["s/epoch"]),
            **{f"{name} (mean)": statistics.fmean(runs[p][name]) for name in ("test ELBO", "test IWAE")},
            "test ELBO (sd)": statistics.stdev(runs[p]["test ELBO"]) if len(args.seeds) > 1 else math.nan,
        }
        for p in PIPELINES
    }
    comparison = {
        "pythae/this s/epoch (worst seed)": min(speedups),
        "pythae/this s/epoch (median)": statistics.median(speedups),
        "ELBO this - pythae (mean)": statistics.fmean(gaps),
        "ELBO this - pythae (standard error)": (
            statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else math.nan
        ),
    }
    print(f"\nwall clock, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(
        f"{args.epochs} epochs of {len(datamodule.train_set)} images, batch 128, fused Adam lr {LR}, seeds "
        f"{' '.join(map(str, args.seeds))}; test: {len(datamodule.test_set)} images, nats per image, "
        f"IWAE k={args.samples}"
    )
    columns = list(results["pythae"])
    print(f"{'pipeline':10}" + "".join(f"{c:>20}" for c in columns))
    for pipeline, figures in results.items():
        print(f"{pipeline:10}" + "".join(f"{figures[c]:20.3f}" for c in columns))
    for name, value in comparison.items():
        print(f"{name:40}{value:10.3f}")
    if args.json:
        summary = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "epochs": args.epochs}
        summary |= peak_gpu_memory()
        args.json.write_text(
            json.dumps(
                {
                    **summary,
                    "seeds": args.seeds,
                    "samples": args.samples,
                    "results": results,
                    "comparison": comparison,
                    "runs": runs,
                },
                indent=2,
            )  # fmt: skip
        )


if __name__ == "__main__":
    main()
