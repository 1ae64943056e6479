"""The README's disentanglement table: vae, β-VAE (kl_weight=4), beta_tcvae and factor_vae on data=sprites, over
seeds, scored by evaluate.py on the test split (MIG, DCI, SAP, FactorVAE score; disentanglement.py).

    python benchmarks/disentanglement.py --out outputs/disentanglement [--seeds 0 1 2] [--epochs 10] [--quick]

1. `train.py -m model=vae,beta_tcvae,factor_vae seed=<seeds>` and `train.py -m model=vae kl_weight=4 seed=<seeds>`
   (conv nets, latent 10, `--epochs` epochs; each run's checkpoint chosen on val/elbo) into <out>/sweep, <out>/beta;
2. `evaluate.py sweep_dir=...` on each (num_samples=0: no FID; k=100 for the nll);
3. prints the markdown table (and writes it to <out>/table.md): each metric's mean ± std over the seeds, on the test
   split, with the test nll beside them.
"""

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

from autoencoders import report
from autoencoders.saved_runs import sweep_jobs

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vae": "sweep", "β-VAE (kl_weight=4)": "beta", "beta_tcvae": "sweep", "factor_vae": "sweep"}
METRICS = ["mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap", "factorvae_score", "nll"]


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, check=True)


def mean_std(values: list[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(out: Path, seeds: int) -> str:
    """One row per model: each metric's mean ± std over its seeds' test scores."""
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in MODELS}
    for sweep in ("sweep", "beta"):
        rows = {row["run"]: row for row in csv.DictReader(open(out / sweep / "summary.csv"))}
        for job in sweep_jobs(out / sweep):
            model = report.describe(job)["model"]
            name = "β-VAE (kl_weight=4)" if sweep == "beta" else model
            scores[name].append({k: float(rows[job.name][f"test/{k}"]) for k in METRICS})
    header = "| model | MIG | DCI disentanglement | DCI completeness | DCI informativeness | SAP | FactorVAE score |"
    lines = [header + " test nll (nats) |", "|---" * 8 + "|"]
    for name, runs in scores.items():
        assert len(runs) == seeds, f"{name}: {len(runs)} scored runs, expected {seeds}"
        cells = [mean_std([run[k] for run in runs]) for k in METRICS[:-1]]
        nll = mean_std([run["nll"] for run in runs], digits=1)
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {nll} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 epoch of 2 batches on a small grid: a smoke test")
    args = parser.parse_args()
    out = args.out.resolve()
    seeds = f"seed={','.join(map(str, args.seeds))}"
    common = [
        "data=sprites",
        "latent_dim=10",
        "model.arch=conv",
        f"trainer.max_epochs={1 if args.quick else args.epochs}",
    ]
    if args.quick:
        common += ["data.source.orientations=2", "data.source.positions=6", "trainer.limit_train_batches=2"]
    run("train.py", "-m", "model=vae,beta_tcvae,factor_vae", seeds, *common, f"hydra.sweep.dir={out / 'sweep'}")
    run("train.py", "-m", "model=vae", "kl_weight=4", seeds, *common, f"hydra.sweep.dir={out / 'beta'}")
    for sweep in ("sweep", "beta"):
        run("evaluate.py", f"sweep_dir={out / sweep}", "num_samples=0", "sort_by=val/elbo",
            f"k={20 if args.quick else 100}")  # fmt: skip
    text = table(out, len(args.seeds))
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
