"""The few-label transfer study, `python train.py experiment=transfer` (conf/experiment/transfer.yaml).

The experiment is one Hydra multirun of classifier jobs (method x labels per class x seed). Its sweeper
(hydra_plugins/autoencoders_transfer.py) first pretrains one encoder per seed with jobs of the configured launcher,
into <sweep dir>/pretrain/seed-<seed>, and checks with `check_unseen` that no autoencoder trained on the classifiers'
validation or test images. `TransferStudy`, a Hydra callback, tabulates the classifiers' test accuracy after they end:
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
from omegaconf import DictConfig, OmegaConf

from autoencoders.cli import CommandCallback, ending_the_command
from autoencoders.errors import UserError
from autoencoders.files import atomic, check_replaceable, write_text, written
from autoencoders.jobs import FINISHED, METRICS_FILE, job_status

# table order: conf/transfer/<method>.yaml, classifier.py and models/semi.py define each
METHODS = ("m1m2", "m2", "frozen", "finetune", "linear", "knn", "scratch", "random", "pixels")
JOBS_DIR = ".transfer_jobs"  # in the sweep dir: one file per started classifier job, holding its run dir
PRETRAIN_DIR = "pretrain"  # the pretraining job's hydra.sweep.subdir
# Command-line overrides that the pretraining run shares with the classifiers: what must agree between them, and the
# machine. The rest (model, seed, data.labels_per_class, the trainer's schedule, ...) concerns the classifiers only.
SHARED = (
    "data",
    "augment",
    "latent_dim",
    "kl_weight",
    "trainer",
    *(f"trainer.{k}" for k in ("accelerator", "devices", "precision")),
)


class Result(NamedTuple):
    method: str
    labels_per_class: int | None  # None: all training labels
    test_acc: float
    selection: str = "small_val"  # the checkpoint tested (training.SELECTIONS)


class Cell(NamedTuple):
    method: str
    labels_per_class: int | None
    runs: int
    mean: float  # test accuracy in %
    std: float  # sample std over the runs in %; nan for a single run
    selection: str = "small_val"


SELECTION_RULES = {  # what each value of `selection` tests, for the tables
    "small_val": "the best checkpoint on as many labelled val images per class as the run trains on",
    "full_val": "the best checkpoint on the whole labelled val split (optimistic with few labels)",
    "none": "the last weights of the fixed schedule, no selection",
}


class TransferStudy(CommandCallback):
    """Record where each classifier job runs; tabulate and plot their results after the sweep."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = HydraConfig.get()
        if hydra.sweep.subdir.startswith(f"{PRETRAIN_DIR}/"):
            return  # a pretraining job, no classifier
        jobs = Path(config.hydra.sweep.dir) / JOBS_DIR
        with ending_the_command(f"Recording job {hydra.job.num}", jobs):  # else missing from the study's table
            write_text(jobs / str(hydra.job.num), hydra.runtime.output_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results, missing = collect(sweep_dir)
        if results:
            from autoencoders.checkpoints import signals_deferred  # imports torch: only once the jobs are done

            cells = summarize(results)
            with ending_the_command("Writing the study's tables", sweep_dir):
                check_replaceable(*(sweep_dir / name for name in ("transfer.csv", "transfer.md", "transfer.png")))
                with signals_deferred():  # Ctrl-C or SIGTERM stops the study once its files are whole
                    write_csv(cells, sweep_dir / "transfer.csv")
                    write_text(sweep_dir / "transfer.md", markdown(cells))
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
    from autoencoders.models.classifier import check_held_out

    datamodule = instantiate(config.data)
    datamodule.setup()
    try:
        check_held_out(read_checkpoint(encoder_ckpt).get(ImageDataModule.__qualname__), datamodule, encoder_ckpt)
    except UserError as e:
        sys.exit(f"error: {e} The study stops before any classifier trains.")


def check_classifier(cfg: DictConfig) -> None:
    """What train.py checks of a classifier job's composed config before it builds anything: its top-level values
    (training.check_config) and its data settings (the data module's constructor; no data is loaded). Raises the
    UserError that the job would fail with."""
    from autoencoders.cli import instantiated
    from autoencoders.training import check_config, select_on_whole_val

    check_config(cfg)
    select_on_whole_val(cfg)  # as training.build (cfg is this job's own composed config)
    instantiated(cfg.data, "data")


def pretrained_checkpoint(sweep_dir: Path, seed: int | str) -> Path:
    """The encoder that the study's classifiers of `seed` use: that seed's pretraining run's last.ckpt."""
    return sweep_dir / PRETRAIN_DIR / f"seed-{seed}" / "checkpoints" / "last.ckpt"


def pretraining_overrides(task_overrides: Sequence[str]) -> list[str]:
    kept = []
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key not in SHARED and not (key.startswith(("data.", "augment.")) and key != "data.labels_per_class"):
            continue
        if override.is_sweep_override():
            sys.exit(
                f"error: the transfer study pretrains one autoencoder per seed, so {override.input_line} cannot be "
                "swept. Run one study per value instead."
            )
        kept.append(override.input_line)
    return kept


def collect(sweep_dir: Path) -> tuple[list[Result], list[str]]:
    """The test accuracy of every job that the study started (wherever its run dir is), and a line for each job
    without a result, with the reason its failure.json gives."""
    results, missing = [], []
    for name in sorted(written(sweep_dir / JOBS_DIR), key=int):
        marker = sweep_dir / JOBS_DIR / name
        if not marker.is_file():  # removed by hand
            continue
        run_dir = Path(marker.read_text())
        status = job_status(run_dir)
        if status.state != FINISHED:
            missing.append(f"job {marker.name} ({run_dir}): {status}")
            continue
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        method = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices.transfer  # transfer=<method>
        test_acc = json.loads((run_dir / METRICS_FILE).read_text())["test/acc"]
        results.append(Result(method, cfg.data.labels_per_class, test_acc, cfg.get("selection", "full_val")))
    return results, missing


def summarize(results: Sequence[Result]) -> list[Cell]:
    """Mean and std over seeds of the test accuracy (%), per method and number of labels (ordered, `all` last)."""
    groups: dict[tuple[str, str, int | None], list[float]] = defaultdict(list)
    for r in results:
        groups[r.method, r.selection, r.labels_per_class].append(100 * r.test_acc)
    cells = [
        Cell(
            method,
            n,
            len(accs),
            statistics.mean(accs),
            statistics.stdev(accs) if len(accs) > 1 else float("nan"),
            selection,
        )  # fmt: skip
        for (method, selection, n), accs in groups.items()
    ]
    return sorted(cells, key=lambda c: (METHODS.index(c.method), c.selection, _label_order(c.labels_per_class)))


def _row(cell: Cell, selections: set[str]) -> str:
    """A table row's name: the method, and its selection rule when the table mixes rules."""
    return cell.method if len(selections) == 1 else f"{cell.method} ({cell.selection})"


def _label_order(n: int | None) -> float:
    return float("inf") if n is None else n


def _label_name(n: int | None) -> str:
    return "all" if n is None else str(n)


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "selection", "labels_per_class", "runs", "test_acc_mean_pct", "test_acc_std_pct"])
        for c in cells:
            row = [c.method, c.selection, _label_name(c.labels_per_class), c.runs, f"{c.mean:.2f}", f"{c.std:.2f}"]
            writer.writerow(row)


def markdown(cells: Sequence[Cell]) -> str:
    """Methods as rows, labels per class as columns, `mean ± std` test accuracy (%) in each cell."""
    labels = sorted({c.labels_per_class for c in cells}, key=_label_order)
    selections = {c.selection for c in cells}
    by_key = {(_row(c, selections), c.labels_per_class): c for c in cells}
    runs = sorted({c.runs for c in cells})
    rules = "; ".join(f"{rule}: {SELECTION_RULES[rule]}" for rule in sorted(selections))
    lines = [
        f"Test accuracy (%), mean ± std over {'/'.join(map(str, runs))} seed{'s' * (runs != [1])} (each with its own "
        f"pretraining), by labelled training images per class. Checkpoint selection ({rules}).",
        "",
        "| method | " + " | ".join(_label_name(n) for n in labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for name in dict.fromkeys(_row(c, selections) for c in cells):
        row = [_format(by_key.get((name, n))) for n in labels]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
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
    selections = {c.selection for c in cells}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(_row(c, selections) for c in cells):
        mine = [c for c in cells if _row(c, selections) == name]
        x = [labels.index(c.labels_per_class) for c in mine]
        ax.errorbar(x, [c.mean for c in mine], yerr=[c.std for c in mine], marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), [_label_name(n) for n in labels])
    ax.set(xlabel="labelled training images per class", ylabel="test accuracy (%)", title="Few-label transfer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
