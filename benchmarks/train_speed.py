"""Seconds per epoch of one model, data set and batch size through three pipelines, taking turns in one process.

  a  train.py's path: ImageDataModule + our LightningModule + Trainer, with train.py's checkpoints, logging and images;
  b  the bar: a minimal hand-written PyTorch loop slicing the same in-memory tensors, with the same net and loss, and
     the validation loss a hand-written loop needs to pick its best epoch (b_train: its training part alone);
  c  a per-sample PIL + ToTensor dataset (how torchvision's MNIST serves images) through the same Trainer path as a;
  l  Lightning's floor: a's data module and LightningModule in a Trainer with nothing else (no logger, checkpoints,
     progress bar or callbacks), so l/b is what Lightning's own loop costs and a/l what this project adds to it.

All pipelines build data and model from one composed train.py config, so they train the same net from the same initial
weights on the same 4,000 bundled MNIST training images. The pipelines run in a rotated order `--repeats` times, so
load from other processes hits all of them alike; a run's figure is its mean epoch (so images logged every few epochs
and checkpoints count in proportion), and the table shows the median over repeats. `--clock cpu` times this process's
CPU instead of the wall clock: steadier on a busy machine, but blind to waiting on disk. The test loss (nats per image;
-ELBO for VAEs) shows that the pipelines learn alike; for VAEs b also reports the importance-weighted bound (k=100).

`--costs` measures instead what each pipeline costs per optimizer step and per epoch, whatever the model: a near-null
model (an MLP AE with one 2-unit hidden layer and a 4-d code) trains on the bundled training set (32 steps an epoch)
and on one ENLARGE times as large, made in memory from shifted copies of it (313 steps), with validation cut to the
same 4 batches in both. Each pipeline's epoch time is fitted as `fixed + per_step * steps`: per_step (microseconds)
is what the loop costs around each step, fixed (milliseconds) what it costs once an epoch (validation, checkpoints,
logging). A small model's epoch on a GPU is about these two figures.

    python benchmarks/train_speed.py [--models ae conv_ae vae] [--epochs 20] [--repeats 3] [--threads N]
                                     [--clock wall|cpu] [--pipelines a b c l] [--json FILE] [--quick] [overrides ...]
    python benchmarks/train_speed.py --costs [--pipelines a b l] [--epochs 10] [--repeats 3] [--json FILE] [--quick]
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from autoencoders.data import ImageDataModule, MNISTSubset, SourceData
from autoencoders.models import AE, VAE, minimised
from autoencoders.training import build, train

CONF = Path(__file__).resolve().parents[1] / "conf"
PIPELINES = ("a", "b", "c", "l")
ENLARGE = 10
NULL_MODEL = [
    "model=ae",
    "model.widths=[2]",
    "latent_dim=4",
    "trainer.limit_val_batches=4",
]  # --costs (4: a 2-d code adds scatter plots)
SIZES = {  # --costs: train.py overrides of the two training sets
    "bundled": [],
    "enlarged": [f"data.source._target_={__name__}.EnlargedDigits", f"+data.source.factor={ENLARGE}"],
}
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class EpochTimer(L.Callback):
    """Time of each training epoch, from its start to the next one's, so validation and checkpoints count."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(self.clock())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(self.clock())

    def epochs(self) -> list[float]:
        return [end - start for start, end in pairwise(self.marks)]


class EnlargedDigits(MNISTSubset):
    """The bundled digits, `factor` times: each copy shifted by up to 2 pixels in each direction, so no two batches are
    the same images (for timing only: the val and test splits hold shifted copies of training images)."""

    def __init__(self, factor: int, cache_dir: str) -> None:
        super().__init__(cache_dir)
        self.factor = factor

    def load(self) -> SourceData:
        data = super().load()
        generator = torch.Generator().manual_seed(0)
        shifts = torch.randint(-2, 3, (self.factor, 2), generator=generator).tolist()
        images = torch.cat([data.images.roll(shift, dims=(2, 3)) for shift in shifts])
        return SourceData(images, data.labels.repeat(self.factor), data.num_classes)


class PILImages(Dataset):
    """One image at a time: uint8 array -> PIL image -> tensor, as torchvision.datasets.MNIST does (uint8 here: the
    data module makes float images of every batch, as for pipeline a)."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images = images.squeeze(1).numpy()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return pil_to_tensor(Image.fromarray(self.images[i])), self.labels[i]


class PILDataModule(ImageDataModule):
    """ImageDataModule's splits, served per sample through PIL and the default collate (pipeline c)."""

    def _batches(self, name: str, **shuffle) -> DataLoader:
        split, generator = getattr(self, f"{name}_set"), torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            PILImages(split.images, split.labels), self.hparams.batch_size, shuffle=bool(shuffle), generator=generator
        )


def compose_config(overrides: list[str], run_dir: Path) -> DictConfig:
    """What `python train.py <overrides>` composes, registered as Hydra's current run writing to `run_dir`."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", [*overrides, f"hydra.runtime.output_dir={run_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def run_framework(cfg: DictConfig, clock: Callable[[], float]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Pipelines a and c: train.py's own `train`. Epoch times, and the test loss of the best checkpoint."""
    timer = EpochTimer(clock)
    metrics = train(cfg, extra_callbacks=[timer])
    return {"": timer.epochs()}, {"test": test_loss(metrics)}


def test_loss(metrics: dict[str, float]) -> float:
    """The minimised objective's test value (test/loss, or test/recon for a plain AE)."""
    return minimised({k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")})


def data_and_model(cfg: DictConfig) -> tuple[ImageDataModule, AE]:
    """The set-up data module and the freshly seeded model that train.py would build from `cfg`."""
    L.seed_everything(cfg.seed, verbose=False)
    return build(cfg)


def run_bare_lightning(cfg: DictConfig, clock: Callable[[], float]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Pipeline l: a's modules and Trainer settings, minus everything train.py adds to the Trainer."""
    datamodule, model = data_and_model(cfg)
    timer = EpochTimer(clock)
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    return {"": timer.epochs()}, {"test": test_loss(trainer.test(model, datamodule=datamodule, verbose=False)[0])}


def run_plain_loop(cfg: DictConfig, clock: Callable[[], float]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Pipeline b: shuffled index slices of the training tensor, the model's own loss and optimizer, nothing else."""
    datamodule, model = data_and_model(cfg)
    optimizer = model.configure_optimizers()
    x, x_val, x_test = (datamodule.inputs(split) for split in ("train", "val", "test"))
    batch_size = cfg.data.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    dynamic = datamodule.hparams.binarize == "dynamic"  # a fresh binary draw of every training batch, as in a
    times: dict[str, list[float]] = {"": [], "_train": []}
    for _ in range(cfg.trainer.max_epochs):
        start = clock()
        model.train()
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = minimised(model.loss_terms(torch.bernoulli(x[index]) if dynamic else x[index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        trained = clock()
        mean_loss(model, x_val, batch_size)
        times[""].append(clock() - start)
        times["_train"].append(trained - start)
    quality = {"test": mean_loss(model, x_test, batch_size)}
    if isinstance(model, VAE):
        bounds = [model.log_likelihood(batch, k=100) for batch in x_test.split(batch_size)]
        quality["iwae100"] = -torch.cat(bounds).mean().item()
    return times, quality


@torch.no_grad()
def mean_loss(model: AE, x: Tensor, batch_size: int) -> float:
    model.eval()
    return sum(minimised(model.loss_terms(batch)).item() * len(batch) for batch in x.split(batch_size)) / len(x)


def run(
    pipeline: str, model: str, overrides: list[str], out: Path, clock: Callable[[], float]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    data = [f"data._target_={__name__}.PILDataModule"] if pipeline == "c" else []
    cfg = compose_config([f"model={model}", *overrides, *data], out / f"{model}_{pipeline}")
    runners = {"b": run_plain_loop, "l": run_bare_lightning}
    return runners.get(pipeline, run_framework)(cfg, clock)


def warm_up(pipelines: list[str], model: str, overrides: list[str], out: Path, clock: str) -> None:
    """One untimed epoch of each pipeline: what a process pays once (lazy imports, first kernels) is not timed."""
    for pipeline in pipelines:
        run(pipeline, model, [*overrides, "trainer.max_epochs=1"], out / "warm-up", CLOCKS[clock])


def run_arguments(description: str, epochs: int) -> argparse.ArgumentParser:
    """The options that train_speed.py and levers.py share: which models, how long, how often, where to."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ae", "conv_ae", "vae"])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: first model, 1 epoch on 100 images (--costs: all)"
    )
    return parser


def run_overrides(args: argparse.Namespace) -> list[str]:
    """train.py overrides for every run; `--quick` also cuts `args` to one model and one repeat."""
    overrides = [f"trainer.max_epochs={1 if args.quick else args.epochs}"]
    if not any(o.startswith("trainer") for o in getattr(args, "overrides", [])):  # e.g. trainer=gpu
        overrides.append("trainer.accelerator=cpu")
    if args.quick:
        args.models, args.repeats = args.models[:1], 1
        overrides += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
        if not getattr(args, "costs", False):  # whose two training sets are the point
            overrides.append("data.labels_per_class=10")
    return overrides


def peak_gpu_memory() -> dict[str, float]:
    """The most GPU memory this process's tensors have held (MiB), on a GPU machine."""
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}


def report(args: argparse.Namespace, heading: str, row: str, table: dict, width: int, **saved: object) -> None:
    """Print `table` (a row of figures per key) under the clock line and `heading`; write `saved` to --json."""
    print(f"\n{args.clock} clock, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(heading)
    columns = list(dict.fromkeys(k for figures in table.values() for k in figures))
    print(f"{row:10}" + "".join(f"{c:>{width}}" for c in columns))
    for name, figures in table.items():
        print(f"{name:10}" + "".join(f"{figures.get(c, float('nan')):{width}.3f}" for c in columns))
    if args.json:
        machine = {"clock": args.clock, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
        args.json.write_text(json.dumps({**machine, **peak_gpu_memory(), **saved}, indent=2))


def steps_per_epoch(overrides: list[str], out: Path) -> int:
    datamodule, _ = data_and_model(compose_config(overrides, out))
    return math.ceil(len(datamodule.train_set) / datamodule.hparams.batch_size)


def costs(args: argparse.Namespace, overrides: list[str]) -> None:
    """--costs: per-step and per-epoch fixed cost of each pipeline, from a near-null model's epochs at two sizes."""
    pipelines = [p for p in args.pipelines if p != "c"]
    times: dict[str, dict[str, list[float]]] = {size: {p: [] for p in pipelines} for size in SIZES}
    sized = {size: [*NULL_MODEL, *extra, *overrides] for size, extra in SIZES.items()}
    with tempfile.TemporaryDirectory() as out:
        steps = {size: steps_per_epoch(sized[size], Path(out) / size) for size in SIZES}
        warm_up(pipelines, "ae", sized["bundled"], Path(out), args.clock)
        for repeat in range(args.repeats):
            for size in SIZES:
                shift = repeat % len(pipelines)
                for pipeline in pipelines[shift:] + pipelines[:shift]:
                    epochs, _ = run(pipeline, "ae", sized[size], Path(out) / f"{repeat}{size}", CLOCKS[args.clock])
                    times[size][pipeline].append(statistics.fmean(epochs[""]))
    results = {}
    for pipeline in pipelines:
        small, large = (statistics.median(times[size][pipeline]) for size in SIZES)
        per_step = (large - small) / (steps["enlarged"] - steps["bundled"])
        results[pipeline] = {
            **{f"{size} s/epoch": statistics.median(times[size][pipeline]) for size in SIZES},
            "us/step": 1e6 * per_step,
            "fixed ms/epoch": 1e3 * (small - per_step * steps["bundled"]),
        }
    heading = (
        f"near-null model ({' '.join(NULL_MODEL)}), {steps['bundled']} and {steps['enlarged']} steps an epoch, "
        f"medians of {args.repeats}"
    )
    report(args, heading, "pipeline", results, 20, steps=steps, costs=results, runs=times)


def main() -> None:
    parser = run_arguments(__doc__, epochs=20)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's choice")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="cpu: this process's CPU time (all threads)")
    parser.add_argument("--costs", action="store_true", help="per-step and per-epoch costs of a near-null model")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for all pipelines, e.g. data.batch_size=256")
    args = parser.parse_args()
    overrides = [*run_overrides(args), *args.overrides]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.costs:
        costs(args, overrides)
        return

    times: dict[str, dict[str, list[float]]] = {model: {} for model in args.models}
    quality: dict[str, dict[str, list[float]]] = {model: {} for model in args.models}
    with tempfile.TemporaryDirectory() as out:
        warm_up(args.pipelines, args.models[0], overrides, Path(out), args.clock)
        for repeat in range(args.repeats):
            for model in args.models:
                shift = repeat % len(args.pipelines)
                for pipeline in args.pipelines[shift:] + args.pipelines[:shift]:
                    epochs, scores = run(pipeline, model, overrides, Path(out) / str(repeat), CLOCKS[args.clock])
                    for suffix, values in epochs.items():
                        times[model].setdefault(pipeline + suffix, []).append(statistics.fmean(values))
                    for name, value in scores.items():
                        quality[model].setdefault(f"{pipeline}_{name}", []).append(float(value))

    results = {
        model: {
            **{f"{k} s/epoch": statistics.median(v) for k, v in times[model].items()},
            **{k: statistics.median(v) for k, v in quality[model].items()},
        }
        for model in args.models
    }
    for model, figures in results.items():
        for num, den in (("a", "b"), ("a", "b_train"), ("c", "a"), ("l", "b"), ("a", "l")):
            if f"{num} s/epoch" in figures and f"{den} s/epoch" in figures:
                figures[f"{num}/{den}"] = figures[f"{num} s/epoch"] / figures[f"{den} s/epoch"]
        if "a" in times[model] and "l" in times[model]:  # the worst repeat (a and l time the same repeat's turn)
            pairs = zip(times[model]["a"], times[model]["l"], strict=True)
            figures["a/l worst"] = max(ours / floor for ours, floor in pairs)
    report(args, " ".join(overrides), "model", results, 16, results=results, runs=times)


if __name__ == "__main__":
    main()
