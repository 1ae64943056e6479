"""The sweep report and each evaluation's page.

A sweep gets summary.csv (one row per job: overrides, status, val and test metrics, sorted by a validation metric);
when jobs differ only in `seed`, summary_over_seeds.csv (each configuration's mean and std over its seeds); the plots
a researcher expects, with error bars over seeds (rate-distortion across kl_weight, metrics against latent_dim, on
the test split: reported, not used to choose); and summary.md and report.html, which open on a leaderboard of the
configurations (the sort metric's mean ± std over seeds, the difference to the best and whether it is within the
noise of the seeds), then the pictures of the evaluations that were scored, side by side, and the full tables.

Every text a user controls (folder names, overrides, statuses, paths) is escaped: report.html is rendered from
Jinja2 templates (templates/) with autoescape, summary.md from one whose every value is Markdown-escaped. Pictures
are embedded only from PNG files under the sweep's or evaluation's own folder, as data URIs built here."""

import base64
import csv
import html
import logging
import math
import re
import shlex
import statistics
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from autoencoders.console import SPLITS
from autoencoders.files import atomic, check_replaceable, remove, write_text
from autoencoders.metrics import COUNTS, METRICS, metric_key
from autoencoders.pictures import DESCRIPTIONS
from autoencoders.samplers import SAMPLERS

log = logging.getLogger(__name__)

# summary.csv's first columns: `overrides` as one shell-quoted cell, `evaluation` the folder (relative to the sweep
# dir) of the evaluation whose pictures the report shows
RUN_COLUMNS = ["run", "status", "model", "latent_dim", "kl_weight", "overrides", "evaluation"]
PLOTS = ("rate_distortion.png", "metrics_vs_latent_dim.png")
REPORT_FILES = ("summary.csv", "summary_over_seeds.csv", "summary.md", "report.html", *PLOTS)
SEED = frozenset({"seed"})
KL_WEIGHT = frozenset({"kl_weight", "model.kl_weight"})
LATENT_DIM = frozenset({"latent_dim", "model.latent_dim"})
MODEL = frozenset({"model"})
KEYS = {"model": MODEL, "latent_dim": LATENT_DIM, "kl_weight": KL_WEIGHT}  # the overrides of a run column
P_LEVEL = 0.05
UNITS = {  # the y-axis unit of each METRICS key (their descriptions say the same in words)
    "nll": "nats/image", "bpd": "bits/dim", "nll_k": "samples", "elbo": "nats/image", "recon": "nats/image",
    "kl": "nats/image", "active_units": "latent dims", "perplexity": "codebook vectors", "usage": "share, 0-1",
    "mse": "squared error per pixel, images in [0, 1]", "fid_{sampler}": "squared feature distance",
    "fid_floor": "squared feature distance", "kid_{sampler}": "squared kernel MMD", "kid_floor": "squared kernel MMD",
    "kid_{sampler}_std": "squared kernel MMD", "kid_floor_std": "squared kernel MMD", "fid_samples": "images",
    "fid_real": "images",
}  # fmt: skip
SAMPLER_DRAWS = {  # what the `samples_<sampler>` pictures (and fid_<sampler>) draw codes from: samplers.py
    "prior": "the model's prior over codes (N(0, I) for an AE or a plain VAE; the fitted or learned prior of a "
    "VQ-VAE, VampPrior or hierarchical VAE)",
    "gaussian": "one Gaussian fitted to the training images' codes (their mean and full covariance)",
    "gmm": "a mixture of full-covariance Gaussians (gmm_components of them) fitted by EM to the training images' codes",
    "maf": "a masked autoregressive flow fitted to the training images' codes",
    "iaf": "an inverse autoregressive flow fitted to the training images' codes",
    "two_stage": "a second-stage VAE fitted to the training images' codes (Dai & Wipf, 2019)",
    "pixelcnn": "a gated PixelCNN fitted to the training images' tokens (VQ-VAE and FSQ)",
}
PICTURE_ORDER = ("reconstructions", "samples", "interpolations", "traversal", "manifold", "scatter", "kl_per_dim")


# Escaping ----------------------------------------------------------------------------------------------------------
_MARKDOWN_SPECIALS = re.compile(r"[\\`*\[\]|~#]|(?<!\w)_|_(?!\w)")  # `_` inside a word emphasises nothing


def markdown_text(value: Any) -> str:
    """`value` as Markdown that renders as the text itself, on one line: HTML's specials as entities, Markdown's
    inline specials backslash-escaped (the lines it goes into never start with it)."""
    if isinstance(value, Markup):  # a code span of `code`
        return str(value)
    text = html.escape(re.sub(r"\s+", " ", str("" if value is None else value)), quote=False)
    return _MARKDOWN_SPECIALS.sub(lambda m: "\\" + m.group(0), text)


def code(value: Any) -> Markup:
    """A Markdown code span of `value`, fenced by more backticks than it holds in a row."""
    text = re.sub(r"\s+", " ", str(value)).replace("|", "\\|")  # a table cell ends at a bare |
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return Markup(f"{fence} {text} {fence}" if text.startswith("`") or text.endswith("`") else fence + text + fence)


TEMPLATES = PackageLoader("autoencoders", "templates")
HTML = Environment(loader=TEMPLATES, autoescape=True, undefined=StrictUndefined, trim_blocks=True)
MARKDOWN = Environment(
    loader=TEMPLATES, autoescape=False, finalize=markdown_text, undefined=StrictUndefined, trim_blocks=True
)
MARKDOWN.filters |= {"code": code, "codes": lambda overrides: Markup(" ".join(map(code, overrides)))}


# Pictures ----------------------------------------------------------------------------------------------------------
def embed(image: Path, folder: Path) -> dict | None:
    """A PNG file under `folder` as a data URI with its size; None for anything else (no file, a path or link that
    leads out of `folder`, not a PNG)."""
    path = image.resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    scale = min(8, max(1, round(512 / max(width, 1))))  # scaled up by whole pixels (image-rendering: pixelated)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"src": uri, "width": width * scale, "height": height * scale}


def caption(kind: str) -> str:
    """What a picture of evaluate.py (or train.py) shows, by its name."""
    family, _, sampler = kind.partition("_")
    if family == "samples" and sampler in SAMPLER_DRAWS:
        return f"Decoded draws of {SAMPLER_DRAWS[sampler]}, at a fixed seed (the same draws each time)."
    return DESCRIPTIONS.get(kind, DESCRIPTIONS.get(family, ""))


def picture_kinds(names: Iterable[str]) -> list[str]:
    """Picture names in reading order: reconstructions, samples of each sampler, interpolations, traversal, ..."""

    def order(name: str) -> tuple[int, int]:
        family, _, sampler = name.partition("_")
        family = name if name in PICTURE_ORDER else family
        return (PICTURE_ORDER.index(family) if family in PICTURE_ORDER else len(PICTURE_ORDER),
                SAMPLERS.index(sampler) if sampler in SAMPLERS else len(SAMPLERS))  # fmt: skip

    return sorted(dict.fromkeys(names), key=order)


def write_run_html(
    path: Path, facts: dict[str, str], metrics: dict[str, float], pictures: list[str], status: str | None
) -> None:
    """An evaluation's report.html: what was scored (`facts`), its metrics with their meaning, and its pictures
    (`<name>.png` beside `path`), embedded."""
    folder = path.parent
    shown = [(kind, caption(kind), embed(folder / f"{kind}.png", folder)) for kind in picture_kinds(pictures)]
    rows = [(name, f"{value:.6g}", unit(name), meaning(name)) for name, value in metrics.items()]
    write_text(path, HTML.get_template("run.html.j2").render(facts=facts, status=status, metrics=rows, pictures=shown))


# Sweep ----------------------------------------------------------------------------------------------------------------
def describe(run_dir: Path) -> dict:
    """A sweep job as its folder name, model choice, latent_dim, kl_weight (None for plain AEs) and overrides (a list,
    as Hydra saved them)."""
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
        "overrides": list(map(str, overrides)),
    }


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
    have -= {f"val/{count}" for count in COUNTS}
    if sort_by in have or not have:
        return sort_by, ""
    key = metric_key(sort_by)
    same_score = sorted(n for n in have if "{sampler}" in key and _key(n) == key)
    fallbacks = [*same_score, "val/nll", "val/elbo", "val/recon", "val/mse", *sorted(have, key=_metric_order)]
    found = next(name for name in fallbacks if name in have)
    said = (
        f"sort_by={sort_by} is no column of this report (not scored: see samplers= and num_samples=), so the rows "
        f"are sorted by {found} instead"
    )
    log.warning("%s; pass sort_by=<one of its val/ columns> to choose.", said)
    return found, said


def check_writable(sweep_dir: Path) -> None:
    """Refuse, before any scoring, a sweep dir where a file of the user's has the name of one of the report's."""
    check_replaceable(*(sweep_dir / name for name in REPORT_FILES))


def write_report(sweep_dir: Path, rows: list[dict], sort_by: str) -> list[dict]:
    """Write summary.csv, summary.md, report.html and the plots into `sweep_dir`; returns the rows in table order."""
    check_writable(sweep_dir)
    sort_by, fallback = sort_column(rows, sort_by)
    rows = ranked(rows, sort_by)
    metrics = sorted({name for row in rows for name in row} - set(RUN_COLUMNS), key=_metric_order)
    write_csv(sweep_dir / "summary.csv", RUN_COLUMNS + metrics, [_one_cell(row) for row in rows])

    configurations = over_seeds(rows, metrics, sort_by)
    seeded = any(c["n"] > 1 for c in configurations)
    if seeded:
        columns = ["configuration", "n", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))]
        write_csv(sweep_dir / "summary_over_seeds.csv", columns, configurations)
    else:  # not left from an older report of the same sweep dir
        remove(sweep_dir / "summary_over_seeds.csv")

    plots = {  # PLOTS
        "rate_distortion.png": rate_distortion(configurations),
        "metrics_vs_latent_dim.png": metrics_vs_latent_dim(
            configurations, [_on_test(sort_by), "test/nll", "test/fid_prior", "test/recon"]
        ),
    }
    for name, figure in plots.items():  # a plot with nothing to show is removed, not left from an older report
        if figure is None:
            remove(sweep_dir / name)
        else:
            with atomic(sweep_dir / name) as tmp:
                figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    page = sweep_page(sweep_dir, rows, configurations, metrics, sort_by, seeded)
    page |= {"fallback": fallback, "plots": [name for name, figure in plots.items() if figure is not None]}
    write_text(sweep_dir / "summary.md", MARKDOWN.get_template("summary.md.j2").render(page))
    pictures = picture_grid(sweep_dir, configurations, set(page["shared"]))
    plots = [(name, embed(sweep_dir / name, sweep_dir)) for name in page["plots"]]
    write_text(sweep_dir / "report.html", HTML.get_template("sweep.html.j2").render(page | pictures, plots=plots))
    log.info("Wrote %s and report.html:\n%s", sweep_dir / "summary.md", _console(page["leaderboard"]))
    return rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _one_cell(row: dict) -> dict:
    """A row of summary.csv: its overrides as one cell, as they would be typed (shell-quoted)."""
    return row | {"overrides": shlex.join(row.get("overrides", []))}


def sweep_page(
    sweep_dir: Path, rows: list[dict], configurations: list[dict], metrics: list[str], sort_by: str, seeded: bool
) -> dict:
    """What summary.md and report.html show, as plain values and tables ({"header": [...], "rows": [[cell, ...]]}; a
    cell is text, or a list of overrides)."""
    scored = [row for row in rows if any(row.get(m) is not None for m in metrics)]
    constant = constants(rows, scored, metrics)
    varying = [m for m in metrics if m not in constant]
    ranked_metrics = [m for m in varying if _key(m) not in COUNTS]
    shared = shared_overrides(rows)
    shown_runs = [c for c in ("status", "model", "latent_dim", "kl_weight") if c not in constant]
    in_columns = frozenset().union(*(KEYS[c] for c in shown_runs if c in KEYS))  # not repeated in `overrides`

    def differing(overrides: list[str], drop: frozenset = frozenset()) -> list[str]:
        return [o for o in overrides if o not in shared and override_key(o) not in drop]

    jobs = {
        "header": ["run", *shown_runs, "overrides", *varying],
        "rows": [
            [row["run"].split("_")[0], *(_cell(row.get(c)) for c in shown_runs),
             differing(row.get("overrides", []), in_columns), *(_cell(row.get(m)) for m in varying)]
            for row in rows
        ],
    }  # fmt: skip
    over_seeds_table = {
        "header": ["configuration", "n", *ranked_metrics],
        "rows": [[differing(c["overrides"]), str(c["n"]), *(spread(c, m) for m in ranked_metrics)]
                 for c in configurations],
    }  # fmt: skip
    fid_counts = {count: _values(scored, count) for count in COUNTS}
    return {
        "sweep": sweep_dir.name,
        "sort_by": sort_by,
        "better": "higher" if METRICS[metric_key(sort_by)][0] else "lower",
        "leaderboard": leaderboard(configurations, sort_by, key_metrics(ranked_metrics, sort_by), differing),
        "p_level": f"{P_LEVEL:.0%}".replace("%", " %"),
        "unranked": [row["run"] for row in rows if row.get("status") != "ok"],
        "shared": shared,
        "constant": [(name, _cell(value)) for name, value in constant.items()],
        "fid_counts": fid_counts if all(fid_counts.values()) else None,
        "seeded": seeded,
        "over_seeds": over_seeds_table,
        "jobs": jobs,
        "meanings": [(key, meaning(key)) for key in sorted(set(map(_key, metrics)), key=_key_order)],
    }


def constants(rows: list[dict], scored: list[dict], metrics: list[str]) -> dict[str, Any]:
    """The columns with one value in every job (metrics: in every scored job), when there are two jobs or more."""
    found = {}
    for column, among in [*((c, rows) for c in ("status", "model", "latent_dim", "kl_weight")),
                          *((m, scored) for m in metrics)]:  # fmt: skip
        values = [row.get(column) for row in among]
        if len(among) > 1 and all(value == values[0] for value in values):
            found[column] = values[0]
    return found


def key_metrics(metrics: list[str], sort_by: str) -> list[str]:
    """The leaderboard's few columns: the sort metric on test, the likelihood's, the FID of each sampler (test)."""
    wanted = [_on_test(sort_by), "test/nll", "test/elbo", "test/recon"]
    wanted += [m for m in metrics if m.startswith("test/") and _key(m) == "fid_{sampler}"]
    return [m for m in dict.fromkeys(wanted) if m in metrics]


def leaderboard(
    configurations: list[dict], sort_by: str, columns: list[str], differing: Callable[[list[str]], list[str]]
) -> dict:
    """The configurations ranked on `sort_by`: mean ± std (n), the difference to the best, and whether it is within
    the noise of the seeds (Welch's t-test against the best's seeds), then `columns` as mean ± std."""
    best = configurations[0] if configurations and sort_by in configurations[0] else None
    rows = []
    for rank, c in enumerate(configurations, 1):
        if sort_by in c and best is not None:
            delta = "best" if c is best else f"{c[sort_by] - best[sort_by]:+.3g}"
            verdict = "" if c is best else welch(_seed_values(c, sort_by), _seed_values(best, sort_by))
        else:
            delta = verdict = ""
        rows.append([str(rank), differing(c["overrides"]), spread(c, sort_by), delta, verdict,
                     *(spread(c, m, n=False) for m in columns)])  # fmt: skip
    header = ["#", "configuration", f"{sort_by} (mean ± std (n))", "difference to the best", "vs the best", *columns]
    return {"header": header, "rows": rows}


def welch(values: list[float], best: list[float]) -> str:
    """Whether the difference to the best is larger than the seeds' noise: Welch's t-test at P_LEVEL, uncorrected for
    the several comparisons and for the best being chosen as the best (so a gap it does not flag is not shown to be
    nothing); no test where either side has a single seed."""
    if min(len(values), len(best)) < 2:
        return "one seed: no test" if len(values) < 2 else "the best has one seed: no test"
    from scipy.stats import ttest_ind  # scipy loads only for sweeps with seeds

    with warnings.catch_warnings():  # identical seeds: no spread, a nan p-value, said below
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest_ind(values, best, equal_var=False).pvalue)
    if math.isnan(p):
        return "no spread over seeds: no test"
    return f"≈ not distinguished (p={p:.2g})" if p >= P_LEVEL else f"distinguished (p={p:.2g})"


def picture_grid(sweep_dir: Path, configurations: list[dict], shared: set[str]) -> dict:
    """report.html's pictures: one row per configuration (its best-ranked job's scored evaluation), one column per
    picture kind, each embedded from under `sweep_dir`; configurations named by their overrides not `shared`."""
    found = []
    for c in configurations:
        job = next((job for job in c["jobs"] if job.get("evaluation")), None)
        if job is not None:  # the evaluation's own pictures, and only from a folder in the sweep
            folder = (sweep_dir / job["evaluation"]).resolve()
            inside = folder.is_relative_to(sweep_dir.resolve())
            images = {p.stem: image for p in sorted(folder.glob("*.png")) if inside and (image := embed(p, folder))}
        if job is not None and images:
            found.append(([o for o in c["overrides"] if o not in shared], job["run"], c["n"], images))
    kinds = picture_kinds(kind for *_, images in found for kind in images)
    return {"picture_kinds": [(kind, caption(kind)) for kind in kinds], "picture_rows": found}


def over_seeds(rows: list[dict], metrics: list[str], sort_by: str) -> list[dict]:
    """The jobs with status ok grouped by their overrides other than `seed`: one row per configuration with its `n`
    seeds, its `jobs`, the mean of every metric under the metric's own name and its standard deviation under
    "<metric> std" (0 for one seed), ranked on the mean of `sort_by`."""
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "ok":
            groups[configuration(row.get("overrides", []), SEED)].append(row)
    configurations = []
    for overrides, group in groups.items():
        summary = {k: group[0].get(k) for k in ("model", "latent_dim", "kl_weight")}
        summary |= {"configuration": shlex.join(overrides), "overrides": list(overrides), "n": len(group)}
        summary["jobs"] = group
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
    return sorted(rows, key=lambda r: (r.get(sort_by) is None, sign * (r.get(sort_by) or 0)))


def override_key(override: str) -> str:
    """The setting an override sets: `model.kl_weight` of `+model.kl_weight=2`."""
    return override.partition("=")[0].lstrip("+~")


def configuration(overrides: list[str], drop: frozenset) -> tuple[str, ...]:
    """The overrides that make a configuration, without those of the settings in `drop` (seed, a plot's x-axis)."""
    return tuple(o for o in overrides if override_key(o) not in drop)


def shared_overrides(rows: list[dict]) -> list[str]:
    return sorted(set.intersection(*(set(row.get("overrides", [])) for row in rows))) if rows else []


def spread(configuration: dict, metric: str, n: bool = True) -> str:
    """A configuration's `metric` as mean ± std (n seeds)."""
    if configuration.get(metric) is None:
        return ""
    text = f"{configuration[metric]:.4g} ± {configuration[f'{metric} std']:.2g}"
    return f"{text} ({configuration['n']})" if n else text


def meaning(name: str) -> str:
    return METRICS.get(_key(name), (None, ""))[1]


def unit(name: str) -> str:
    return UNITS.get(_key(name), "0-1")


def _key(name: str) -> str:
    """metric_key, or the bare name of a column METRICS does not list."""
    try:
        return metric_key(name)
    except KeyError:
        return name.split("/", 1)[-1]


def _key_order(key: str) -> int:
    """METRICS order."""
    order = list(METRICS)
    return order.index(key) if key in order else len(order)


def _metric_order(name: str) -> tuple[int, int, str]:
    """Validation before test, then METRICS order."""
    split = name.split("/")[0]
    return SPLITS.index(split) if split in SPLITS else len(SPLITS), _key_order(_key(name)), name


def _on_test(metric: str) -> str:
    return "test/" + metric.split("/", 1)[-1]


def _seed_values(configuration: dict, metric: str) -> list[float]:
    return [job[metric] for job in configuration["jobs"] if isinstance(job.get(metric), float | int)]


def _values(rows: list[dict], count: str) -> str:
    """The `<split>/<count>` of `rows` in words: '500', or '500 (val), 400 (test)'; '' without any."""
    found = {split: {row[f"{split}/{count}"] for row in rows if row.get(f"{split}/{count}") is not None}
             for split in SPLITS}  # fmt: skip
    said = {split: " or ".join(f"{v:g}" for v in sorted(values)) for split, values in found.items() if values}
    if len(set(said.values())) == 1:
        return next(iter(said.values()))
    return ", ".join(f"{text} ({split})" for split, text in said.items())


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _console(table: dict) -> str:
    """A table for the log, one row a line."""
    return "\n".join(
        "  ".join(shlex.join(cell) if isinstance(cell, list) else cell for cell in row)
        for row in [table["header"], *table["rows"]]
    )


# Plots ---------------------------------------------------------------------------------------------------------------
def _lines(rows: list[dict], x: str, drop: frozenset, needed: tuple[str, ...]) -> dict[str, list[dict]]:
    """Configurations that have every `needed` value as lines along `x`: one per configuration less the overrides of
    `drop` (seed and the x-axis setting), labelled by the overrides that tell the lines apart, points sorted by `x`."""
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for row in rows:
        if all(row.get(name) is not None for name in needed):
            groups[configuration(row.get("overrides", []), drop)].append(row)
    shared = set.intersection(*map(set, groups)) if groups else set()
    return {
        " ".join(o for o in key if o not in shared) or "(all)": sorted(group, key=lambda r: r[x])
        for key, group in sorted(groups.items())
    }


def rate_distortion(rows: list[dict]) -> Figure | None:
    """KL (rate) against reconstruction NLL (distortion) of every VAE configuration (over_seeds: bars of ± one
    standard deviation over seeds), one line per configuration through its kl_weights; None unless some line has two
    kl_weights or more."""
    lines = _lines(rows, "kl_weight", SEED | KL_WEIGHT, ("test/kl", "test/recon", "kl_weight"))
    lines = {label: group for label, group in lines.items() if len({r["kl_weight"] for r in group}) > 1}
    if not lines:
        return None
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    for label, group in lines.items():
        kl, recon = [r["test/kl"] for r in group], [r["test/recon"] for r in group]
        spread = {
            f"{axis}err": [r.get(f"{m} std", 0) for r in group] for axis, m in (("x", "test/kl"), ("y", "test/recon"))
        }
        ax.errorbar(kl, recon, **spread, fmt="o-", capsize=3, label=label)
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
    one line per configuration (less its latent_dim) across latent_dim, in the same colour in every panel."""
    metrics = [m for m in dict.fromkeys(metrics) if any(row.get(m) is not None for row in rows)]
    if not metrics:
        return None
    lines = _lines(rows, "latent_dim", SEED | LATENT_DIM, ("latent_dim",))
    figure = Figure(figsize=(4 * len(metrics) + 2, 3.8), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        for i, (label, line) in enumerate(lines.items()):  # a configuration has one colour in every panel
            group = [r for r in line if r.get(metric) is not None]
            if not group:
                continue
            x, y = [r["latent_dim"] for r in group], [r[metric] for r in group]
            spread = [r.get(f"{metric} std", 0) for r in group]
            ax.errorbar(x, y, yerr=spread, fmt="o-", capsize=3, color=f"C{i % 10}", label=label)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="latent_dim [code dimensions]", ylabel=f"{metric} [{unit(metric)}]", title=metric)
    handles = {label: h for ax in figure.axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    return figure
