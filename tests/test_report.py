"""The sweep report and an evaluation's page on sweeps written directly (no training): user text that would be markup
stays text, in report.html and summary.md; the leaderboard; the pictures of what was scored; the plots."""

import base64
import csv
import html
import io
import re
import shlex
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt
from markupsafe import escape
from PIL import Image
from scipy.stats import ttest_ind

from autoencoders import report
from autoencoders.pictures import DESCRIPTIONS
from autoencoders.samplers import SAMPLERS
from tests.helpers import in_browser, run_script, run_train

# Each payload goes into every field a user controls: the sweep's and the jobs' folder names, an override's value,
# tags, a failed job's status, an evaluation's checkpoint path (no "/": they are folder names too).
PAYLOADS = {
    "script": "<script>document.title='x1'",
    "img onerror": "<img src=x onerror=\"document.title='x2'\">",
    "svg onload": "<svg onload=\"document.title='x3'\">",
    "quote": 'a" onmouseover="document.title=\'x4\'" b="',
}
KINDS = ("reconstructions", "samples_prior", "samples_gaussian", "samples_gmm", "interpolations", "traversal")
SAFE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "i", "b", "code", "br", "span",
             "table", "thead", "tbody", "tr", "th", "td", "img", "figure", "figcaption", "details", "summary", "ul",
             "li", "dl", "dt", "dd", "em", "a"}  # fmt: skip


def job(sweep: Path, name: str, overrides: list[str], model: str = "vae", latent_dim: int = 2, kl_weight=1.0,
        status: str = "ok", shade: int = 100, **metrics: float) -> dict:  # fmt: skip
    """A scored job as evaluate.py leaves it (its .hydra files, a val evaluation's pictures) and its report row."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    config = {"model": {"latent_dim": latent_dim, "kl_weight": kl_weight if model == "vae" else None}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"model": model}}}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    evaluation = run / "eval" / "best_val_data-1_abcd"
    evaluation.mkdir(parents=True)
    for kind in KINDS:
        Image.new("L", (20, 12), shade).save(evaluation / f"{kind}.png")
    row = report.describe(run) | {"status": status}
    if status == "ok":
        row["evaluation"] = str(evaluation.relative_to(sweep))
        row |= {name.replace("__", "/"): value for name, value in metrics.items()}  # val__recon: val/recon
    return row


def payload_sweep(root: Path, payload: str) -> tuple[Path, list[dict]]:
    """Two configurations of two seeds and a failed job, the payload in every field."""
    sweep = root / f"sweep {payload}"
    rows = []
    for i, (latent_dim, seed) in enumerate([(2, 0), (2, 1), (4, 0), (4, 1)]):
        overrides = [f"latent_dim={latent_dim}", f"seed={seed}", f"+tags='{payload}',plain",
                     f"+data.note={payload}{latent_dim}"]  # fmt: skip
        rows.append(job(sweep, f"{i}_{payload}", overrides, latent_dim=latent_dim, shade=40 * i,
                        val__recon=100.0 + i, test__recon=101.0 + i, test__kl=5.0 + i))  # fmt: skip
    rows.append(job(sweep, f"4_{payload}", ["latent_dim=8", "seed=0"], status=f"failed: {payload}"))
    return sweep, rows


class Elements(HTMLParser):
    """Every element of a page with its attributes, and its title."""

    def __init__(self, page: str):
        super().__init__()
        self.elements, self.title, self._in_title = [], "", False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        self.title += data if self._in_title else ""


def assert_no_markup_but_ours(page: str) -> list[dict]:
    """No element but the report's own, no event handler; returns the images' attributes."""
    elements = Elements(page).elements
    assert {tag for tag, _ in elements} <= SAFE_TAGS, {tag for tag, _ in elements} - SAFE_TAGS
    assert not [attrs for _, attrs in elements if any(name.startswith("on") for name in attrs)]
    return [attrs for tag, attrs in elements if tag == "img"]


def decoded(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src.removeprefix(prefix))))
    image.load()
    return image


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_user_text_is_text_in_report_html_and_summary_md(payload, tmp_path):
    sweep, rows = payload_sweep(tmp_path, payload)
    ranked = report.write_report(sweep, rows, "val/recon")
    page = (sweep / "report.html").read_text()
    assert Elements(page).title == f"Sweep {sweep.name}"
    images = assert_no_markup_but_ours(page)
    assert len(images) == 2 * len(KINDS) + 1  # each configuration's pictures, and metrics against latent_dim
    assert all(decoded(image["src"]).width > 10 for image in images)
    tags = f"+tags='{payload}',plain"
    assert f"<code>{escape(tags)}</code>" in page  # shown as text, one override

    summary = (sweep / "summary.md").read_text()
    for rendered in (MarkdownIt("commonmark").enable("table").render(summary),):
        images = assert_no_markup_but_ours(rendered)
        assert [image["src"] for image in images] == ["metrics_vs_latent_dim.png"]
        assert f"Sweep {sweep.name}" in html.unescape(rendered)
        assert f"failed: {payload}" in html.unescape(rendered)  # the status, as typed
    with open(sweep / "summary.csv", newline="") as f:
        cells = [shlex.split(row["overrides"]) for row in csv.DictReader(f)]
    assert cells == [row["overrides"] for row in ranked]  # one cell each, read back whole


def test_an_evaluations_page_names_what_was_scored_and_keeps_its_path_and_status_as_text(tmp_path):
    payload = "".join(PAYLOADS.values())
    folder = tmp_path / f"run {payload}" / "eval" / "best"
    folder.mkdir(parents=True)
    for kind in KINDS:
        Image.new("L", (20, 12), 50).save(folder / f"{kind}.png")
    facts = {"title": f"VAE (latent_dim=2) on the val split of mnist-1: {payload}.ckpt", "model": "VAE",
             "split": "val", "checkpoint": str(tmp_path / f"{payload}.ckpt"), "settings": "k=20"}  # fmt: skip
    report.write_run_html(folder / "report.html", facts, {"val/nll": 90.0}, list(KINDS), f"crashed: {payload}")
    page = (folder / "report.html").read_text()
    assert Elements(page).title == facts["title"]
    images = assert_no_markup_but_ours(page)
    assert len(images) == len(KINDS) and all(decoded(image["src"]).size == (20, 12) for image in images)
    assert {(image["width"], image["height"]) for image in images} == {("160", "96")}  # scaled up 8 times
    for text in (facts["checkpoint"], f"crashed: {payload}", DESCRIPTIONS["interpolations"]):
        assert str(escape(text)) in page  # a*z1 + (1-a)*z2 as written: no Markdown italics


def in_chromium(pages: list[Path], folder: Path) -> list[dict]:
    """Headless Chromium opens copies of `pages` in `folder` (nothing beside them can help), each in a frame of a page
    that reports, after their scripts ran, their titles, any element or event handler that text would have added,
    and how many of their images decoded."""
    folder.mkdir()
    for i, page in enumerate(pages):
        shutil.copy(page, folder / f"{i}.html")
    (folder / "check.html").write_text(
        "".join(f'<iframe src="{i}.html"></iframe>' for i in range(len(pages))) + '<pre id="out"></pre><script>'
        "const frames = [...document.querySelectorAll('iframe')], found = []; let left = frames.length;"
        "frames.forEach((f, i) => f.onload = () => { const d = f.contentDocument, images = [...d.images];"
        "found[i] = {title: d.title, injected: d.querySelectorAll('script, svg, iframe').length,"
        "handlers: [...d.querySelectorAll('*')].filter(e => [...e.attributes].some(x => x.name.startsWith('on')))"
        ".length, images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length};"
        "if (--left === 0) out.textContent = JSON.stringify(found); });</script>"
    )
    return in_browser(folder / "check.html")


def safe(title: str, images: int) -> dict:
    """What in_chromium finds on a page whose text stayed text: its own title, nothing added, every image decoded."""
    return {"title": title, "injected": 0, "handlers": 0, "images": images, "decoded": images}


@pytest.mark.slow  # a browser per payload: `pytest -m slow`
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_headless_chromium_runs_no_user_text_and_decodes_every_picture(payload, tmp_path):
    sweep, rows = payload_sweep(tmp_path, payload)
    report.write_report(sweep, rows, "val/recon")
    run_page = sweep / rows[0]["evaluation"] / "report.html"
    facts = {"title": "VAE on the val split", "checkpoint": str(sweep / rows[0]["run"] / f"{payload}.ckpt")}
    report.write_run_html(run_page, facts, {}, list(KINDS), payload)
    found = in_chromium([sweep / "report.html", run_page], tmp_path / "browsed")
    assert found == [safe(f"Sweep {sweep.name}", 2 * len(KINDS) + 1), safe("VAE on the val split", len(KINDS))]


@pytest.mark.slow  # trains a tiny two-job sweep and scores it (a minute): `pytest -m slow`
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_a_sweep_trained_and_scored_end_to_end_with_markup_in_its_folder_and_tags_shows_it_as_text(tmp_path):
    sweep = tmp_path / 'xss<svg onload="document.title=1">'
    tags = "+tags='<img src=x onerror=\"document.title=2\">',plain"  # two jobs, one tag each
    run_train("-m", "model=vae", "latent_dim=2", tags, f"hydra.sweep.dir='{sweep}'", cwd=tmp_path)
    settings = ["k=2", "kid_subsets=10", "fid.epochs=1", "images.num_samples=16", "samplers=[prior,gaussian]"]
    run_script("evaluate.py", f"sweep_dir='{sweep}'", f"cache_dir={tmp_path / 'cache'}", *settings, cwd=tmp_path)
    with open(sweep / "summary.csv", newline="") as f:
        found = {o for row in csv.DictReader(f) for o in shlex.split(row["overrides"]) if o.startswith("+tags")}
    assert found == {"+tags='<img src=x onerror=\"document.title=2\">'", "+tags=plain"}  # as typed, one cell
    pages = [sweep / "report.html", *sorted(sweep.glob("*/eval/*_val_*/report.html"))]
    found = in_chromium(pages, tmp_path / "browsed")
    assert len(found) == 3 and found[0] == safe(f"Sweep {sweep.name}", found[0]["images"])
    assert found[0]["images"] >= 2 * 5 + 1  # reconstructions, 2 samplers' samples, interpolations, traversal; a plot
    for page in found[1:]:
        assert page == safe(page["title"], page["images"]) and page["title"].startswith("VAE (latent_dim=2) on the val")


def test_pictures_are_embedded_only_from_files_under_the_sweep(tmp_path):
    """A path named in text (a status), an evaluation folder outside the sweep, a link out of the sweep or out of the
    evaluation's own folder: none is read."""
    secret = tmp_path / "secret.png"
    Image.new("L", (9, 9), 7).save(secret)
    sweep = tmp_path / "sweep"
    rows = [job(sweep, f"{i}_job", [f"latent_dim={i}"], latent_dim=i, val__recon=float(i)) for i in (1, 2, 3)]
    rows[0]["status"] = f'ok <img src="{secret}"> {secret}'  # listed as not ok, its path as text
    rows[1]["evaluation"] = ".."  # tmp_path, which holds secret.png: outside the sweep
    linked = sweep / rows[2]["evaluation"] / "traversal.png"
    linked.unlink()
    linked.symlink_to(secret)
    elsewhere = sweep / rows[2]["evaluation"] / "interpolations.png"  # to another job's picture, in the sweep
    elsewhere.unlink()
    elsewhere.symlink_to(sweep / rows[1]["run"] / "interpolations.png")
    Image.new("L", (9, 9), 8).save(elsewhere.resolve())
    report.write_report(sweep, rows, "val/recon")
    page = (sweep / "report.html").read_text()
    sources = [image["src"] for image in assert_no_markup_but_ours(page)]
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert len(sources) == len(KINDS) - 2  # the third job's, less the links; the second's none
    assert "<b>traversal</b>" not in page and "<b>secret</b>" not in page and str(escape(secret)) in page


def seeded_rows(sweep: Path, values: dict[str, list[float]], **common: float) -> list[dict]:
    """Jobs of configurations `latent_dim=<key>`, one per seed, with val/nll `values` (test/nll 1 more)."""
    return [
        job(sweep, f"{i}_{name}_{seed}", [f"latent_dim={name}", f"seed={seed}"], latent_dim=int(name),
            val__nll=value, test__nll=value + 1, **common)
        for i, (name, seeds) in enumerate(values.items()) for seed, value in enumerate(seeds)
    ]  # fmt: skip


def leaderboard(summary: str) -> list[list[str]]:
    """summary.md's leaderboard: its rows' cells."""
    table = summary.split("## Leaderboard")[1].split("\n\n|")[1].split("\n\n")[0]
    return [re.split(r"\s*(?<!\\)\|\s*", line.strip().strip("|").strip()) for line in ("|" + table).splitlines()]


def test_the_leaderboard_ranks_configurations_and_marks_gaps_within_the_noise_of_the_seeds(tmp_path):
    values = {"2": [90.0, 90.2, 89.9], "4": [90.1, 90.4, 89.8], "8": [95.0, 95.1, 95.2], "16": [91.0]}
    rows = seeded_rows(tmp_path, values, val__nll_k=10.0, test__fid_prior=20.0, test__fid_floor=3.0)
    for i, row in enumerate(rows):
        row["test/fid_prior"] += i  # varies: a leaderboard column
    report.write_report(tmp_path, rows, "val/nll")
    summary = (tmp_path / "summary.md").read_text()
    header, _, *ranked = leaderboard(summary)
    assert header[:5] == ["\\#", "configuration", "val/nll (mean ± std (n))", "difference to the best", "vs the best"]
    assert header[5:] == ["test/nll", "test/fid_prior"]  # test of the sort metric, FID; no constant, no count
    assert [row[1] for row in ranked] == ["`latent_dim=2`", "`latent_dim=4`", "`latent_dim=16`", "`latent_dim=8`"]
    assert ranked[0][2:5] == ["90.03 ± 0.15 (3)", "best", ""]
    p_within = ttest_ind(values["4"], values["2"], equal_var=False).pvalue
    p_beyond = ttest_ind(values["8"], values["2"], equal_var=False).pvalue
    assert ranked[1][3:5] == ["+0.0667", f"≈ not distinguished (p={p_within:.2g})"] and p_within > 0.05
    assert ranked[2][2:5] == ["91 ± 0 (1)", "+0.967", "one seed: no test"]
    assert ranked[3][4] == f"distinguished (p={p_beyond:.2g})" and p_beyond < 0.05
    assert "Welch's t-test" in summary and "at 5 %" in summary
    constant = "`status` = ok, `model` = vae, `kl_weight` = 1, `val/nll_k` = 10, `test/fid_floor` = 3."
    assert f"Same in every run: {constant}" in summary
    every_job = summary.split("## Every job")[1].split("\n\n")[2]
    assert "nll_k" not in every_job and "fid_floor" not in every_job and "test/fid_prior" in every_job
    with open(tmp_path / "summary.csv", newline="") as f:
        assert {"val/nll_k", "test/fid_floor", "overrides"} <= set(next(csv.DictReader(f)))  # all columns kept
    page = (tmp_path / "report.html").read_text()
    assert page.index('class="leaderboard"') < page.index('class="pictures"') < page.index("<details>")


def test_fid_counts_are_said_once_beside_the_fid_columns_and_never_ranked(tmp_path):
    counts = {"val__fid_samples": 500, "test__fid_samples": 500, "val__fid_real": 500, "test__fid_real": 400}
    rows = seeded_rows(tmp_path, {"2": [1.0], "4": [2.0]}, **counts)
    report.write_report(tmp_path, rows, "val/nll")
    summary = (tmp_path / "summary.md").read_text()
    assert (
        "FID/KID from 500 samples per sampler against the 500 (val), 400 (test) images of each split; the floor "
        "scores as many training images against the same." in summary
    )
    assert "fid_samples" not in "".join(map(str, leaderboard(summary)))
    rows = seeded_rows(tmp_path / "none", {"2": [1.0], "4": [2.0]})
    report.write_report(tmp_path / "none", rows, "val/nll")
    assert "FID/KID from" not in (tmp_path / "none" / "summary.md").read_text()


def test_overrides_with_spaces_stay_one_cell_and_model_columns_are_not_repeated_in_them(tmp_path):
    rows = [job(tmp_path, f"{i}_job", [f"model={model}", "model.widths=[512, 256]", f"seed={i}"], model=model,
                val__recon=float(i)) for i, model in enumerate(["ae", "vae"])]  # fmt: skip
    report.write_report(tmp_path, rows, "val/recon")
    page = (tmp_path / "report.html").read_text()
    assert "<code>model.widths=[512, 256]</code>" in page and "<code>model=ae</code>" in page  # shared; a leader
    every_job = page.split("Every job")[1]
    assert "<td>ae</td>" in every_job and "model=ae" not in every_job  # its own column, not repeated
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [shlex.split(row["overrides"])[1] for row in csv.DictReader(f)] == ["model.widths=[512, 256]"] * 2


def test_the_pictures_are_the_scored_evaluations_captioned_by_what_each_sampler_draws(tmp_path):
    rows = [job(tmp_path, f"{i}_job", [f"latent_dim={i}"], latent_dim=i, shade=60 * i, val__recon=float(i))
            for i in (1, 2)]  # fmt: skip
    (tmp_path / "1_job" / "pictures").mkdir()
    Image.new("L", (20, 12), 255).save(tmp_path / "1_job" / "pictures" / "samples.png")  # train.py's last weights
    report.write_report(tmp_path, rows, "val/recon")
    page = (tmp_path / "report.html").read_text()
    grid = page.split('class="pictures"')[1].split("</table>")[0]
    headers = re.findall(r"<th><b>([^<]*)</b><span class=\"caption\">([^<]*)</span>", grid)
    assert [kind for kind, _ in headers] == list(KINDS)
    captions = dict(headers)
    assert "prior" in captions["samples_prior"] and "Gaussian fitted to the training" in captions["samples_gaussian"]
    assert "mixture" in captions["samples_gmm"] and len(set(captions.values())) == len(KINDS)
    shades = [decoded(src).getpixel((0, 0)) for src in re.findall(r'src="([^"]*)"', grid)]
    assert shades == [60] * len(KINDS) + [120] * len(KINDS)  # each row its configuration's evaluation, ranked
    assert "image-rendering: pixelated" in page


def test_rate_distortion_needs_two_kl_weights_in_a_line_and_draws_one_line_per_configuration(tmp_path):
    def rows(kl_weights: dict[str, list[float]]) -> list[dict]:
        return [{"run": f"{width}_{beta}", "status": "ok", "model": "vae", "latent_dim": 2, "kl_weight": beta,
                 "overrides": [f"model.width={width}", f"kl_weight={beta}", "seed=0"], "test/kl": beta,
                 "test/recon": 100 - beta} for width, betas in kl_weights.items() for beta in betas]  # fmt: skip

    one_each = rows({"64": [1.0], "128": [4.0]})
    assert report.rate_distortion(report.over_seeds(one_each, ["test/kl", "test/recon"], "test/recon")) is None
    figure = report.rate_distortion(report.over_seeds(rows({"64": [1.0, 4.0], "128": [1.0]}), ["test/kl",
                                                      "test/recon"], "test/recon"))  # fmt: skip
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model.width=64"]  # the line with two weights
    assert "[nats/image]" in ax.get_xlabel() and "[nats/image]" in ax.get_ylabel()
    figure = report.metrics_vs_latent_dim(report.over_seeds(one_each, ["test/recon"], "test/recon"), ["test/recon"])
    assert figure.axes[0].get_ylabel() == "test/recon [nats/image]" and "latent_dim [" in figure.axes[0].get_xlabel()


def test_every_samplers_pictures_say_what_it_draws_from():
    captions = [report.caption(f"samples_{name}") for name in SAMPLERS]
    assert len(set(captions)) == len(SAMPLERS) and all(text.startswith("Decoded draws of ") for text in captions)
