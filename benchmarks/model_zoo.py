"""The README's model table: every model of the zoo on the bundled digits, trained, scored and reused by this code.

    python benchmarks/model_zoo.py --out outputs/zoo [--models ae vae ...] [--epochs 50] [--quick]

1. `train.py -m model=<each>` (latent 16, seed 0, `--epochs` epochs) into <out>/sweep;
2. `evaluate.py sweep_dir=<out>/sweep`: val and test, nll with k=1000 (VAEs), FID/KID of every sampler (SAMPLERS;
   pixelcnn for the quantised models only);
3. `train.py -m model=classifier encoder_ckpt=<each job's last.ckpt> data.labels_per_class=10` into <out>/classifiers
   (the frozen encoder and a head, trained as the transfer study does: 500 steps, the best val/loss checkpoint);
4. prints the markdown table (and writes it to <out>/table.md): what each model is chosen on and reports, the val FID
   of its best sampler (chosen on val) with that sampler's val KID, active units (VAEs) or codebook perplexity
   (VQ-VAE), the 10-label test accuracy, and each training run's wall time from its train.log;
5. writes <out>/samples.png: each model's samples from that best sampler (its val evaluation's picture), side by side
   and captioned.
"""

import argparse
import csv
import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageDraw

from autoencoders import report
from autoencoders.loggers import latest_evaluations
from autoencoders.saved_runs import run_config, sweep_jobs

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["ae", "conv_ae", "vae", "conv_vae", "dae", "sparse_ae", "wae", "rae", "aae", "iwae", "beta_tcvae", "info_vae"]
MODELS += ["vamp", "vae_iaf", "hvae", "factor_vae", "vqvae", "fsq", "rae_gp", "beta_vae_c", "vae_nf", "miwae", "ciwae"]
MODELS += ["piwae", "msssim_vae", "vae_gan", "svae", "hamiltonian_vae"]  # every autoencoder of conf/model
SAMPLERS = ("prior", "gaussian", "gmm", "pixelcnn")
CLASSIFIER = [  # as conf/experiment/transfer.yaml trains its classifiers
    "model=classifier", "data.labels_per_class=10", "trainer.max_epochs=-1", "+trainer.max_steps=500",
    "+trainer.val_check_interval=25", "+trainer.check_val_every_n_epoch=null",
]  # fmt: skip


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, check=True)


def wall_time(run_dir: Path) -> float:
    """Seconds from the first to the last line of a run's train.log."""
    stamps = [line[1:24] for line in (run_dir / "train.log").read_text().splitlines() if line.startswith("[20")]
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def jobs(sweep: Path) -> dict[str, Path]:
    """The model choice of each job of a train.py sweep -> its dir."""
    return {report.describe(job)["model"]: job for job in sweep_jobs(sweep)}


def classifier_jobs(sweep: Path) -> dict[str, Path]:
    """The autoencoder run whose encoder each classifier job of a sweep uses -> the classifier job's dir."""
    return {Path(run_config(job).encoder_ckpt).parent.parent.name: job for job in sweep_jobs(sweep)}


def cell(value: float | None, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(out: Path, models: list[str]) -> tuple[str, dict[str, str]]:
    """The markdown table, and each model's best sampler (on val FID)."""
    rows = {row["run"]: row for row in csv.DictReader(open(out / "sweep" / "summary.csv"))}
    best_samplers = {}
    classifiers = classifier_jobs(out / "classifiers")
    lines = [
        "| model | val nll (recon) | **test nll (recon)** | best sampler: val FID | its val KID | active units / "
        "perplexity | 10-label test acc | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, job in sorted(jobs(out / "sweep").items(), key=lambda item: models.index(item[0])):
        row = {k: float(v) for k, v in rows[job.name].items() if v and k.startswith(("val/", "test/"))}
        vae = "val/nll" in row
        val = cell(row["val/nll"]) if vae else f"({cell(row['val/recon'])})"
        test = f"**{cell(row['test/nll'])}**" if vae else f"({cell(row['test/recon'])})"
        fids = {s: row[f"val/fid_{s}"] for s in SAMPLERS if f"val/fid_{s}" in row}
        best = best_samplers[model] = min(fids, key=fids.get)
        kid = f"{cell(row[f'val/kid_{best}'])} ± {cell(row[f'val/kid_{best}_std'])}"
        units = row.get("val/active_units") or row.get("val/perplexity")
        accuracy = json.loads((classifiers[job.name] / "metrics.json").read_text())["test/acc"]
        lines.append(
            f"| `{model}` | {val} | {test} | {best}: {cell(fids[best], 0)} | {kid} | {cell(units)} | "
            f"{100 * accuracy:.1f} % | {wall_time(job):.0f} s |"
        )
    return "\n".join(lines), best_samplers


def samples_sheet(out: Path, best_samplers: dict[str, str], columns: int = 7) -> Path:
    """Each model's `samples_<best sampler>.png` of its val evaluation, captioned, in rows of `columns`."""
    sweep = jobs(out / "sweep")
    pictures = {
        f"{model} ({sampler})": Image.open(latest_evaluations(sweep[model] / "eval")["val"] / f"samples_{sampler}.png")
        for model, sampler in best_samplers.items()
    }
    width = max(picture.width for picture in pictures.values())
    height, caption = max(picture.height for picture in pictures.values()), 16
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + caption)), "white")
    for i, (name, picture) in enumerate(pictures.items()):
        x, y = i % columns * width, i // columns * (height + caption)
        ImageDraw.Draw(sheet).text((x + 4, y + 2), name, fill="black")
        sheet.paste(picture, (x, y + caption))
    sheet.save(out / "samples.png")
    return out / "samples.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 batches, k=20: a smoke test of the pipeline")
    args = parser.parse_args()
    out = args.out.resolve()
    tiny = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    quick_eval = ["k=20", "kid_subsets=10", "fid.epochs=1", "images.num_samples=16"]
    epochs = 1 if args.quick else args.epochs
    run("train.py", "-m", f"model={','.join(args.models)}", f"trainer.max_epochs={epochs}",
        f"hydra.sweep.dir={out / 'sweep'}", *(tiny if args.quick else []))  # fmt: skip
    run(
        "evaluate.py",
        f"sweep_dir={out / 'sweep'}",
        f"samplers=[{','.join(SAMPLERS)}]",
        *(quick_eval if args.quick else []),
    )
    checkpoints = ",".join(str(job / "checkpoints" / "last.ckpt") for job in jobs(out / "sweep").values())
    quick_classifier = [*CLASSIFIER[:3], "+trainer.max_steps=4", "+trainer.val_check_interval=2", CLASSIFIER[-1]]
    classifier = quick_classifier if args.quick else CLASSIFIER
    run("train.py", "-m", *classifier, f"encoder_ckpt={checkpoints}", f"hydra.sweep.dir={out / 'classifiers'}")
    text, best_samplers = table(out, args.models)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"Samples of each model: {samples_sheet(out, best_samplers)}")


if __name__ == "__main__":
    main()
