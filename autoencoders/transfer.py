"""The few-label transfer study, `python train.py experiment=transfer` (conf/experiment/transfer.yaml).

The experiment is one Hydra multirun of classifier jobs (method x labels per class x seed). Its sweeper
(hydra_plugins/autoencoders_transfer.py) first pretrains the encoder with one job of the configured launcher, into
<sweep dir>/pretrain, and checks with `check_unseen` that the autoencoder never trained on the classifiers' validation
or test images. `TransferStudy`, a Hydra callback, tabulates the classifiers' test accuracy after they end:
transfer.csv, transfer.md and transfer.png in the sweep dir. Every job must deliver its result: one that does not
fails the study.
"""

import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from autoencoders.jobs import FINISHED, METRICS_FILE, job_status

METHODS = ("frozen", "finetune", "scratch", "random", "pixels")  # table order; classifier.py defines each
JOBS_DIR = ".transfer_jobs"  # in the sweep dir: one file per started classifier job, holding its run dir
PRETRAIN_DIR = "pretrain"  # the pretraining job's hydra.sweep.subdir
# Command-line overrides that the pretraining run shares with the classifiers: what must agree between them, and the
# machine. The rest (model, seed, data.labels_per_class, the trainer's schedule, ...) concerns the classifiers only.
SHARED = (
    "data",
    "latent_dim",
    "kl_weight",
    "trainer",
    *(f"trainer.{k}" for k in ("accelerator", "devices", "precision")),
)


class Result(NamedTuple):
    method: str
    labels_per_class: int | None  # None: all training labels
    test_acc: float


class Cell(NamedTuple):
    method: str
    labels_per_class: int | None
    runs: int
    mean: float  # test accuracy in %
    std: float  # sample std over the runs in %; nan for a single run


class TransferStudy(Callback):
    """Record where each classifier job runs; tabulate and plot their results after the sweep."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = HydraConfig.get()
        if hydra.sweep.subdir == PRETRAIN_DIR:
            return  # the pretraining job, no classifier
        jobs = Path(config.hydra.sweep.dir) / JOBS_DIR
        jobs.mkdir(parents=True, exist_ok=True)
        (jobs / str(hydra.job.num)).write_text(hydra.runtime.output_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results, missing = collect(sweep_dir)
        if results:
            cells = summarize(results)
            write_csv(cells, sweep_dir / "transfer.csv")
            (sweep_dir / "transfer.md").write_text(markdown(cells))
            plot(cells, sweep_dir / "transfer.png")
            print(
                f"\n{markdown(cells)}\ntransfer study: wrote transfer.csv, transfer.md and transfer.png to {sweep_dir}"
            )
        if missing:
            what = "a partial table of the others was written" if results else "no table was written"
            sys.exit(
                f"error: {len(missing)} job(s) of the transfer study in {sweep_dir} have no result, so {what}:\n"
                + "\n".join(f"  {line}" for line in missing)
            )


def check_unseen(config: DictConfig, encoder_ckpt: Path) -> None:
    """Stop the study unless the classifiers' validation and test images are unseen by the pretraining run."""
    from hydra.utils import instantiate

    from autoencoders.checkpoints import read_checkpoint
    from autoencoders.data import ImageDataModule
    from autoencoders.errors import UserError
    from autoencoders.models.classifier import check_held_out

    datamodule = instantiate(config.data)
    datamodule.setup()
    try:
        check_held_out(read_checkpoint(encoder_ckpt).get(ImageDataModule.__qualname__), datamodule, encoder_ckpt)
    except UserError as e:
        sys.exit(f"error: {e} The study stops before any classifier trains.")


def pretraining_overrides(task_overrides: Sequence[str]) -> list[str]:
    kept = []
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key not in SHARED and not (key.startswith("data.") and key != "data.labels_per_class"):
            continue
        if override.is_sweep_override():
            sys.exit(
                f"error: the transfer study pretrains one autoencoder, so {override.input_line} cannot be swept. "
                "Run one study per value instead."
            )
        kept.append(override.input_line)
    return kept


def collect(sweep_dir: Path) -> tuple[list[Result], list[str]]:
    """The test accuracy of every job that the study started (wherever its run dir is), and a line for each job
    without a result, with the reason its failure.json gives."""
    results, missing = [], []
    for marker in sorted((sweep_dir / JOBS_DIR).glob("*"), key=lambda p: int(p.name)):
        run_dir = Path(marker.read_text())
        status = job_status(run_dir)
        if status.state != FINISHED:
            missing.append(f"job {marker.name} ({run_dir}): {status}")
            continue
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        test_acc = json.loads((run_dir / METRICS_FILE).read_text())["test/acc"]
        results.append(Result(cfg.model.method, cfg.data.labels_per_class, test_acc))
    return results, missing


def summarize(results: Sequence[Result]) -> list[Cell]:
    """Mean and std over seeds of the test accuracy (%), per method and number of labels (ordered, `all` last)."""
    groups: dict[tuple[str, int | None], list[float]] = defaultdict(list)
    for r in results:
        groups[r.method, r.labels_per_class].append(100 * r.test_acc)
    cells = [
        Cell(method, n, len(accs), statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else float("nan"))
        for (method, n), accs in groups.items()
    ]
    return sorted(cells, key=lambda c: (METHODS.index(c.method), _label_order(c.labels_per_class)))


def _label_order(n: int | None) -> float:
    return float("inf") if n is None else n


def _label_name(n: int | None) -> str:
    return "all" if n is None else str(n)


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "labels_per_class", "runs", "test_acc_mean_pct", "test_acc_std_pct"])
        for c in cells:
            writer.writerow([c.method, _label_name(c.labels_per_class), c.runs, f"{c.mean:.2f}", f"{c.std:.2f}"])


def markdown(cells: Sequence[Cell]) -> str:
    """Methods as rows, labels per class as columns, `mean ± std` test accuracy (%) in each cell."""
    labels = sorted({c.labels_per_class for c in cells}, key=_label_order)
    by_key = {(c.method, c.labels_per_class): c for c in cells}
    runs = sorted({c.runs for c in cells})
    lines = [
        f"Test accuracy (%), mean ± std over {'/'.join(map(str, runs))} seeds, by labelled images per class.",
        "",
        "| method | " + " | ".join(_label_name(n) for n in labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for method in dict.fromkeys(c.method for c in cells):
        row = [_format(by_key.get((method, n))) for n in labels]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _format(cell: Cell | None) -> str:
    if cell is None:
        return ""
    return f"{cell.mean:.1f}" if cell.runs < 2 else f"{cell.mean:.1f} ± {cell.std:.1f}"


def plot(cells: Sequence[Cell], path: Path) -> None:
    """Accuracy vs labels per class, one line per method, error bars of one std (categorical x: `all` is last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({c.labels_per_class for c in cells}, key=_label_order)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(c.method for c in cells):
        mine = [c for c in cells if c.method == method]
        x = [labels.index(c.labels_per_class) for c in mine]
        ax.errorbar(x, [c.mean for c in mine], yerr=[c.std for c in mine], marker="o", capsize=3, label=method)
    ax.set_xticks(range(len(labels)), [_label_name(n) for n in labels])
    ax.set(xlabel="labelled training images per class", ylabel="test accuracy (%)", title="Few-label transfer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
