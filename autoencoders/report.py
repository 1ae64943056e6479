"""The sweep report: one table of every job (overrides, status, val and test metrics) sorted by a validation metric,
written as summary.csv and summary.md; when jobs differ only in `seed`, one more table of each configuration's mean
± std over its seeds (summary_over_seeds.csv, and in summary.md), ranked on its validation mean; and the plots a
researcher expects, with error bars over seeds: rate-distortion across kl_weight, and metrics against latent_dim per
model (on the test split: reported, not used to choose). report.html holds all of it and each run's pictures, in one
self-contained page."""

import base64
import csv
import html
import logging
import re
import statistics
from collections import defaultdict
from pathlib import Path

import markdown
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from autoencoders.console import SPLITS
from autoencoders.files import atomic, check_replaceable, remove, write_text
from autoencoders.metrics import METRICS, metric_key

log = logging.getLogger(__name__)

RUN_COLUMNS = ["run", "status", "model", "latent_dim", "kl_weight", "overrides"]


def describe(run_dir: Path) -> dict:
    """A sweep job as its folder name, model choice, latent_dim, kl_weight (None for plain AEs) and overrides."""
    hydra_dir = run_dir / ".hydra"
    config = OmegaConf.load(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").is_file() else None
    choices = OmegaConf.load(hydra_dir / "hydra.yaml") if (hydra_dir / "hydra.yaml").is_file() else None
    overrides = OmegaConf.load(hydra_dir / "overrides.yaml") if (hydra_dir / "overrides.yaml").is_file() else []
    # as typed: a transfer study's encoder_ckpt=<sweep>/pretrain/seed-${seed}/... resolves only in the job's config
    overrides = OmegaConf.to_container(overrides, resolve=False) if overrides else []

    def select(saved, key: str):
        return OmegaConf.select(saved, key, throw_on_resolution_failure=False) if saved else None

    return {
        "run": run_dir.name,
        "model": select(choices, "hydra.runtime.choices.model"),
        "latent_dim": select(config, "model.latent_dim"),
        "kl_weight": select(config, "model.kl_weight"),
        "overrides": " ".join(map(str, overrides)),
    }


PLOTS = ("rate_distortion.png", "metrics_vs_latent_dim.png")


def scored_runs(sweep_dir: Path) -> int:
    """How many runs the sweep's current summary.csv scored (with metrics: ok, or a crashed job's checkpoints); 0
    without one."""
    path = sweep_dir / "summary.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return sum(any(value for key, value in row.items() if key and "/" in key) for row in csv.DictReader(f))


def sort_column(rows: list[dict], sort_by: str) -> tuple[str, str]:
    """`sort_by`, or when no row has it (e.g. val/fid_prior with samplers=[gmm], or num_samples=0) the first
    validation metric the rows have of: the same score of another sampler, val/nll, val/elbo, val/recon, val/mse; with
    the sentence that says so ('' when `sort_by` is there)."""
    have = {name for row in rows for name, value in row.items() if value is not None and name.startswith("val/")}
    if sort_by in have or not have:
        return sort_by, ""
    key = metric_key(sort_by)
    same_score = sorted(n for n in have if "{sampler}" in key and metric_key(n) == key)
    fallbacks = [*same_score, "val/nll", "val/elbo", "val/recon", "val/mse", *sorted(have, key=_metric_order)]
    found = next(name for name in fallbacks if name in have)
    said = (
        f"sort_by={sort_by} is no column of this report (not scored: see samplers= and num_samples=), so the rows "
        f"are sorted by {found} instead"
    )
    log.warning("%s; pass sort_by=<one of its val/ columns> to choose.", said)
    return found, said


REPORT_FILES = ("summary.csv", "summary_over_seeds.csv", "summary.md", "report.html", *PLOTS)


def check_writable(sweep_dir: Path) -> None:
    """Refuse, before any scoring, a sweep dir where a file of the user's has the name of one of the report's."""
    check_replaceable(*(sweep_dir / name for name in REPORT_FILES))


def write_report(sweep_dir: Path, rows: list[dict], sort_by: str) -> list[dict]:
    """Write summary.csv, summary.md and the plots into `sweep_dir`; returns the rows in table order."""
    check_writable(sweep_dir)
    sort_by, fallback = sort_column(rows, sort_by)
    higher_better = METRICS[metric_key(sort_by)][0]
    rows = ranked(rows, sort_by)
    metrics = sorted({name for row in rows for name in row} - set(RUN_COLUMNS), key=_metric_order)
    columns = RUN_COLUMNS + metrics
    with atomic(sweep_dir / "summary.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    configurations = over_seeds(rows, metrics, sort_by)
    seeded = any(c["n"] > 1 for c in configurations)
    seed_columns = ["configuration", "n", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))]
    if seeded:
        with atomic(sweep_dir / "summary_over_seeds.csv") as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=seed_columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(configurations)
    else:  # not left from an older report of the same sweep dir
        remove(sweep_dir / "summary_over_seeds.csv")

    plots = {  # PLOTS
        "rate_distortion.png": rate_distortion(configurations),
        "metrics_vs_latent_dim.png": metrics_vs_latent_dim(
            configurations, [sort_by, "test/nll", "test/fid_prior", "test/recon"]
        ),
    }
    for name, figure in plots.items():  # a plot with nothing to show is removed, not left from an older report
        if figure is None:
            remove(sweep_dir / name)
        else:
            with atomic(sweep_dir / name) as tmp:
                figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    table = markdown_table(rows, columns)
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        *([f"Note: {fallback}.", ""] if fallback else []),
        f"Sorted by `{sort_by}` ({'higher' if higher_better else 'lower'} is better), a validation metric: the test "
        "columns are reported, not used to choose. `run` is the job number "
        f"(folder `<run>_*`); overrides shared by every run: `{' '.join(shared_overrides(rows))}`.",
        "",
        table,
        "",
        *(over_seeds_section(configurations, metrics, sort_by) if seeded else []),
        *(f"- `<split>/{key}`: {METRICS[key][1]}" for key in dict.fromkeys(map(metric_key, metrics))),
        *(f"\n![{name}]({name})" for name, figure in plots.items() if figure is not None),
    ]
    write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    pictures = [f"\n## Pictures of {row['run']}\n\n" + "".join(
        f'<figure style="display:inline-block"><img src="{image.resolve()}" alt="{image.stem}">'
        f"<figcaption>{image.stem}</figcaption></figure>"
        for image in sorted((sweep_dir / row["run"] / "pictures").glob("*.png"))
    ) for row in rows]  # fmt: skip
    write_html(sweep_dir / "report.html", f"Sweep {sweep_dir.name}", [*lines, *pictures], sweep_dir)
    log.info("Wrote %s and report.html:\n%s", sweep_dir / "summary.md", table)
    return rows


def write_html(path: Path, title: str, lines: list[str], folder: Path) -> None:
    """One self-contained HTML page of the Markdown `lines`: every image they show (a path, relative to `folder` or
    absolute) embedded as a data URI, so the page opens from disk, moved or mailed, without its folder."""

    def embed(match: re.Match) -> str:
        image = folder / match.group(2)
        data = base64.b64encode(image.read_bytes()).decode() if image.is_file() else ""
        return f"{match.group(1)}data:image/png;base64,{data}{match.group(3)}"

    body = re.sub(
        r'(<img [^>]*src=")([^"]+\.png)(")', embed, markdown.markdown("\n".join(lines), extensions=["tables"])
    )
    write_text(path, HTML.format(title=html.escape(title), body=body))


HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }} img {{ max-width: 100%; margin: 0.3em; }}
</style></head><body>
{body}
</body></html>
"""


def over_seeds(rows: list[dict], metrics: list[str], sort_by: str) -> list[dict]:
    """The scored jobs grouped by their overrides other than `seed`: one row per configuration with its `n` seeds,
    the mean of every metric under the metric's own name and its standard deviation under "<metric> std" (0 for
    one seed), ranked on the mean of `sort_by`."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "ok":
            groups[" ".join(o for o in row["overrides"].split() if not o.startswith("seed="))].append(row)
    configurations = []
    for configuration, group in groups.items():
        summary = {k: group[0].get(k) for k in ("model", "latent_dim", "kl_weight")}
        summary |= {"configuration": configuration, "n": len(group)}
        for metric in metrics:
            values = [row[metric] for row in group if isinstance(row.get(metric), float | int)]
            if values:
                summary[metric] = summary[f"{metric} mean"] = statistics.fmean(values)
                summary[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        configurations.append(summary)
    return ranked(configurations, sort_by)


def ranked(rows: list[dict], sort_by: str) -> list[dict]:
    """`rows` best first by `sort_by`; those without it last, in their order."""
    sign = -1 if METRICS[metric_key(sort_by)][0] else 1
    return sorted(rows, key=lambda r: (sort_by not in r, sign * r.get(sort_by, 0)))


def over_seeds_section(configurations: list[dict], metrics: list[str], sort_by: str) -> list[str]:
    """summary.md's table of the configurations: mean ± std (n) of every metric, ranked on `sort_by`'s mean."""
    shared = set.intersection(*(set(c["configuration"].split()) for c in configurations))

    def cell(configuration: dict, metric: str) -> str:
        if metric not in configuration:
            return ""
        return f"{configuration[metric]:.4g} ± {configuration[f'{metric} std']:.2g} ({configuration['n']})"

    lines = [
        "## Over seeds",
        "",
        f"Jobs that differ only in `seed`, as mean ± standard deviation (number of seeds), ranked on the mean of "
        f"`{sort_by}`; also in summary_over_seeds.csv.",
        "",
        "| configuration | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]
    for configuration in configurations:
        name = " ".join(o for o in configuration["configuration"].split() if o not in shared) or "(all)"
        lines.append(f"| {name} | " + " | ".join(cell(configuration, m) for m in metrics) + " |")
    return [*lines, ""]


def _metric_order(name: str) -> tuple[int, int, str]:
    """Validation before test, then METRICS order."""
    return SPLITS.index(name.split("/")[0]), list(METRICS).index(metric_key(name)), name


def shared_overrides(rows: list[dict]) -> list[str]:
    return sorted(set.intersection(*(set(row["overrides"].split()) for row in rows)))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The rows as a Markdown table: runs by job number, overrides without those every run shares."""
    shared = shared_overrides(rows)

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if column == "run":
            value = value.split("_")[0]
        elif column == "overrides":
            value = " ".join(o for o in value.split() if o not in shared)
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows])


def _groups(rows: list[dict], keys: tuple[str, ...], needed: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Scored rows that have every `needed` value, grouped by their `keys` values."""
    groups = defaultdict(list)
    for row in rows:
        if all(row.get(name) is not None for name in needed):
            groups[tuple(row.get(k) for k in keys)].append(row)
    return groups


def rate_distortion(rows: list[dict]) -> Figure | None:
    """KL (rate) against reconstruction NLL (distortion) of every VAE configuration (over_seeds: bars of ± one
    standard deviation over seeds), one line per model and latent_dim through its kl_weights; None without VAEs."""
    groups = _groups(rows, ("model", "latent_dim"), ("test/kl", "test/recon", "kl_weight"))
    if not groups:
        return None
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    for (model, latent_dim), group in sorted(groups.items(), key=str):
        group.sort(key=lambda r: r["kl_weight"])
        kl, recon = [r["test/kl"] for r in group], [r["test/recon"] for r in group]
        spread = {
            f"{axis}err": [r.get(f"{m} std", 0) for r in group] for axis, m in (("x", "test/kl"), ("y", "test/recon"))
        }
        ax.errorbar(kl, recon, **spread, fmt="o-", capsize=3, label=f"{model}, latent_dim={latent_dim}")
        for row in group:
            ax.annotate(f"β={row['kl_weight']:g}", (row["test/kl"], row["test/recon"]), fontsize=8)
    ax.set(
        xlabel="rate: KL(q(z|x) || p(z)) [nats/image]",
        ylabel="distortion: E_q[-log p(x|z)] [nats/image]",
        title="Rate-distortion across kl_weight (test split)",
    )
    ax.legend(fontsize="small")
    return figure


def metrics_vs_latent_dim(rows: list[dict], metrics: list[str]) -> Figure | None:
    """One panel per metric that some configuration has (over_seeds: bars of ± one standard deviation over seeds),
    one line per model (and kl_weight) across latent_dim, in the same colour in every panel."""
    metrics = [m for m in dict.fromkeys(metrics) if any(row.get(m) is not None for row in rows)]
    if not metrics:
        return None
    series = sorted(_groups(rows, ("model", "kl_weight"), ("latent_dim",)), key=str)
    colours = {key: f"C{i % 10}" for i, key in enumerate(series)}
    figure = Figure(figsize=(4 * len(metrics) + 2, 3.8), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        for key, group in _groups(rows, ("model", "kl_weight"), (metric, "latent_dim")).items():
            group.sort(key=lambda r: r["latent_dim"])
            model, kl_weight = key
            label = model if kl_weight is None else f"{model} (kl_weight={kl_weight:g})"
            x, y = [r["latent_dim"] for r in group], [r[metric] for r in group]
            spread = [r.get(f"{metric} std", 0) for r in group]
            ax.errorbar(x, y, yerr=spread, fmt="o-", capsize=3, color=colours[key], label=label)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="latent_dim", title=metric)  # its name says its split
    handles = {label: h for ax in figure.axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    return figure
