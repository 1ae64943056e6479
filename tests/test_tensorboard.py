"""What `tensorboard --logdir <sweep>` shows of train.py's and evaluate.py's runs, asked of a real TensorBoard over
its plugin routes (as its web page asks them), under both of its loaders: the HParams tab's columns and which it ticks,
the order of the charts, the Text tab's config and the pictures' descriptions."""

import html
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from autoencoders.loggers import EVAL_RUN, RunMetrics, metric_order, write_experiment
from tests.helpers import hparams_plugin_route, run_script, run_train

EVALUATE = ["k=5", "samplers=[prior]", "num_samples=50", "kid_subsets=5", "fid.epochs=1", "images.num_samples=16"]
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


# What TensorBoard's HParams tab ticks (tf-hparams-query-pane in tensorboard's webfiles.zip, 2.21): it sorts the
# experiment's hparams with those flagged `differs` first (a stable sort) and ticks the first five, and ticks the
# first five metrics in the experiment's order.
def ticked(experiment: dict) -> tuple[list[str], list[str]]:
    hparams = sorted(experiment["hparamInfos"], key=lambda info: not info.get("differs", False))
    return [h["name"] for h in hparams[:5]], [m["name"]["tag"] for m in experiment["metricInfos"][:5]]


# A sweep's outcome, without TensorBoard ------------------------------------------------------------------------------
VAE = ["val/elbo", "val/kl", "val/recon", "test/elbo", "test/nll", "test/nll_k", "test/recon"]
AE = ["val/recon", "val/mse", "test/recon", "test/mse"]


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([RunMetrics("val/elbo", VAE)] * 2, [("verdict/val/elbo", ""), ("verdict/test/nll", "")]),
        (
            [RunMetrics("val/recon", AE), RunMetrics("val/elbo", VAE)],
            [("verdict/val/recon", ""), ("verdict/test/recon", ""), ("verdict/val/elbo", ""), ("verdict/test/nll", "")],
        ),
        (
            [RunMetrics("val/elbo", VAE), RunMetrics("val/recon", AE)],
            [("verdict/val/recon", ""), ("verdict/test/recon", ""), ("verdict/val/elbo", ""), ("verdict/test/nll", "")],
        ),
        (  # evaluate.py's: test before val, FID first, the same value in every run (k, the floor) last
            [
                RunMetrics("val/elbo", VAE, {"val/fid_prior": 9, "test/nll_k": 5, "test/nll": 1, "test/fid_prior": 8}),
                RunMetrics("val/elbo", VAE, {"val/fid_prior": 7, "test/nll_k": 5, "test/nll": 2, "test/fid_prior": 6}),
            ],
            [("verdict/val/elbo", ""), ("verdict/test/nll", "")]
            + [(f"verdict/{name}", EVAL_RUN) for name in ["test/fid_prior", "test/nll", "val/fid_prior", "test/nll_k"]],
        ),
    ],
    ids=["vae", "ae_vae", "vae_ae", "evaluated"],
)
def test_the_hparams_columns_are_the_selection_metrics_their_test_values_then_evaluate_py_s(runs, expected):
    assert metric_order(runs) == expected


@pytest.mark.parametrize(
    ("hparams", "listed"),
    [
        ([{"model": "vae", "latent_dim": 2, "lr": 0.1}, {"model": "vae", "latent_dim": 3, "lr": 0.1}], ["latent_dim"]),
        ([{"model": "vae", "latent_dim": 2, "lr": 0.1}], ["latent_dim", "lr", "model"]),  # one run: all, none differ
    ],
    ids=["sweep", "single_run"],
)
def test_the_hparams_tab_lists_the_hparams_that_differ_and_shows_integers_as_integers(tmp_path, hparams, listed):
    with SummaryWriter(tmp_path) as writer:
        write_experiment(writer, hparams, [("verdict/val/elbo", "")])
    experiment = hparams_plugin_route(tmp_path, "/experiment", {"hparamsLimit": 1000})
    infos = {info["name"]: info for info in experiment["hparamInfos"]}
    assert sorted(infos) == listed and ticked(experiment)[0] == listed
    latent = infos["latent_dim"]  # written as text: the tab prints any number to 5 digits, 2 as 2.0000
    assert latent["type"] == "DATA_TYPE_STRING" and latent["domainDiscrete"] == [str(r["latent_dim"]) for r in hparams]


# Sweeps, and TensorBoard serving them --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logdirs(tmp_path_factory) -> dict[str, Path]:
    """A VAE sweep over latent_dim, and an AE + VAE sweep (in a folder whose name needs quoting on a command line)
    before and after evaluate.py scored it."""
    root = tmp_path_factory.mktemp("tensorboard")
    run_train("-m", "model=vae", "latent_dim=2,3", f"hydra.sweep.dir={root / 'vae'}", cwd=root)
    mixed = root / "ae and vae"
    run_train("-m", "model=ae,vae", "latent_dim=2,3", f"hydra.sweep.dir={mixed}", cwd=root)
    shutil.copytree(mixed, root / "evaluated")
    run_script("evaluate.py", f"sweep_dir={root / 'evaluated'}", f"cache_dir={root / 'cache'}", *EVALUATE, cwd=root)
    return {"vae": root / "vae", "mixed": mixed, "evaluated": root / "evaluated"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, request: dict | None = None) -> dict | list:
    data = None if request is None else json.dumps(request).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"})) as answer:
        return json.loads(answer.read())


def runs_of(logdir: Path) -> set[str]:
    """The runs TensorBoard lists: each folder under `logdir` that holds event files."""
    return {str(p.parent.relative_to(logdir)) for p in logdir.rglob("*tfevents*")} - {"."}


@pytest.fixture(scope="module", params=["true", "false"], ids=["fast_loader", "python_loader"])
def tensorboard(request, tmp_path_factory, logdirs) -> Iterator[dict[str, str]]:
    """One TensorBoard per logdir, by its loader (the Rust data server by default, Python's with load_fast=false):
    the URL of each, once it has read every run."""
    servers, urls = [], {}
    try:
        for name, logdir in logdirs.items():
            port = free_port()
            command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
            command += ["--port", str(port), "--load_fast", request.param, "--reload_interval", "1"]
            log = tmp_path_factory.mktemp("tensorboard-log") / "log.txt"
            servers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w")))
            urls[name] = f"http://127.0.0.1:{port}"
        for name, url in urls.items():
            expected, deadline = runs_of(logdirs[name]), time.monotonic() + 90
            while True:
                try:
                    if expected <= set(get(f"{url}/data/runs")):
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"TensorBoard did not list the runs of {logdirs[name]}"
                time.sleep(0.5)
            time.sleep(2)  # the last run listed may still be loading
        yield urls
    finally:
        for server in servers:
            server.terminate()
            server.wait()


def experiment(url: str) -> dict:
    return get(f"{url}/data/plugin/hparams/experiment", {"experimentName": "", "hparamsLimit": 1000})


def session_groups(url: str, experiment: dict) -> list[dict]:
    """The rows of the HParams tab's table, asked with the request its page sends."""
    columns = [{"hparam": info["name"], "includeInResult": True} for info in experiment["hparamInfos"]]
    columns += [{"metric": info["name"], "includeInResult": True} for info in experiment["metricInfos"]]
    request = {"experimentName": "", "allowedStatuses": STATUSES, "colParams": columns, "startIndex": 0}
    return get(f"{url}/data/plugin/hparams/session_groups", request | {"sliceSize": 100})["sessionGroups"]


MIXED = ["verdict/val/recon", "verdict/test/recon", "verdict/val/elbo", "verdict/test/nll"]
TICKED_METRICS = {"vae": MIXED[2:], "mixed": MIXED, "evaluated": [*MIXED, "verdict/test/fid_prior"]}
DIFFERING = {"vae": ["latent_dim"], "mixed": ["latent_dim", "model"], "evaluated": ["latent_dim", "model"]}


@pytest.mark.slow
@pytest.mark.parametrize("sweep", ["vae", "mixed", "evaluated"])
def test_the_hparams_tab_ticks_what_differs_and_the_selection_test_and_evaluation_metrics(tensorboard, logdirs, sweep):
    found = experiment(tensorboard[sweep])
    hparams, metrics = ticked(found)
    assert sorted(hparams) == DIFFERING[sweep] and metrics == TICKED_METRICS[sweep]
    assert [info["name"] for info in found["hparamInfos"]] == DIFFERING[sweep]  # nothing else to tick
    groups = session_groups(tensorboard[sweep], found)
    jobs = {path.parent.name for path in logdirs[sweep].glob("*/metrics.json")}
    assert {group["name"] for group in groups} == jobs and len(jobs) in (2, 4)
    for group in groups:
        (session,) = group["sessions"]
        assert session["status"] == "STATUS_SUCCESS" and group["hparams"]["latent_dim"] in ("2", "3")  # not 2.0000
        values = {(m["name"]["tag"], m["name"].get("group", "")): m["value"] for m in group["metricValues"]}
        run = logdirs[sweep] / group["name"]
        trained = json.loads((run / "metrics.json").read_text())
        outcome = {tag.removeprefix("verdict/"): value for (tag, g), value in values.items() if g == ""}
        assert outcome == pytest.approx({name: trained[name] for name in outcome})  # the selected checkpoint's
        evaluated = {}
        for path in sorted((run / "eval").glob("*/metrics.json")):
            evaluated |= json.loads(path.read_text())
        assert {tag.removeprefix("verdict/"): value for (tag, g), value in values.items() if g == EVAL_RUN} == (
            pytest.approx(evaluated)
        )  # evaluate.py's metrics, FID among them, in the session of the run they score
        assert ("test/fid_prior" in evaluated) == (sweep == "evaluated")


@pytest.mark.slow
@pytest.mark.parametrize("sweep", ["mixed", "evaluated"])
def test_the_charts_open_on_the_training_curves_and_each_run_s_evaluations_are_one_run(tensorboard, logdirs, sweep):
    tags = get(f"{tensorboard[sweep]}/data/plugin/scalars/tags")
    jobs = sorted(path.parent.name for path in logdirs[sweep].glob("*/metrics.json"))
    evaluations = [f"{job}/eval" for job in jobs] if sweep == "evaluated" else []
    assert sorted(tags) == sorted(jobs + evaluations)
    assert sorted(get(f"{tensorboard[sweep]}/data/runs")) == sorted([".", *jobs, *evaluations])  # ".": the record
    groups = sorted({tag.split("/")[0] for run in tags.values() for tag in run})  # TensorBoard's order of its charts
    assert groups == ["train", "val", "verdict"]  # the one-point scalars, the test split's and evaluate.py's, last
    images = get(f"{tensorboard[sweep]}/data/plugin/images/tags")
    for run in evaluations:  # evaluate.py's scalars and pictures, after the training's
        assert {tag.split("/")[0] for tag in [*tags[run], *images[run]]} == {"verdict"}


@pytest.mark.slow
def test_the_text_tab_shows_the_command_line_and_the_resolved_config(tensorboard, logdirs):
    url = tensorboard["mixed"]
    (job,) = [path.parent.name for path in logdirs["mixed"].glob("*latent_dim-2_model-vae/metrics.json")]
    assert "config/text_summary" in get(f"{url}/data/plugin/text/tags")[job]  # SummaryWriter.add_text's tag
    (text,) = get(f"{url}/data/plugin/text/text?run={urllib.parse.quote(job)}&tag=config/text_summary")
    page = html.unescape(text["text"])
    assert "<p>Command:</p>\n<pre><code>python train.py " in page  # that trains this job alone: its overrides, not -m
    assert "model=vae" in page and "latent_dim=2" in page and "model=ae" not in page and " -m " not in page
    assert "latent_dim: 2" in page and "${" not in page  # resolved: model.latent_dim is 2, not ${latent_dim}


@pytest.mark.slow
def test_the_pictures_keep_their_descriptions_under_either_loader(tensorboard):
    tags = get(f"{tensorboard['evaluated']}/data/plugin/images/tags")
    descriptions = {tag: info["description"] for run in tags.values() for tag, info in run.items()}
    assert descriptions["visual/samples"].startswith("<p>Decoded draws of the model")
    assert descriptions["verdict/test/reconstructions"].startswith("<p>Top row: held-out images")  # evaluate.py's
    assert all(descriptions.values())


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["single_run", "sweep_job"])
def test_evaluating_one_run_adds_its_metrics_to_the_hparams_tab_of_its_run_or_sweep(tmp_path, trained):
    if trained == "single_run":
        run_train("model=vae", "latent_dim=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        logdir = run = tmp_path / "run"
    else:
        logdir = tmp_path / "sweep"
        run_train("-m", "model=vae", "latent_dim=2", f"hydra.sweep.dir={logdir}", cwd=tmp_path)
        (run,) = [path.parent for path in logdir.glob("*/metrics.json")]
    before = hparams_plugin_route(logdir, "/experiment", {})["metricInfos"]
    quick = ["num_samples=0", "samplers=[prior]", "k=2", f"cache_dir={tmp_path / 'cache'}"]
    run_script("evaluate.py", f"run_dir={run}", *quick, cwd=tmp_path)
    after = [
        (m["name"]["tag"], m["name"].get("group", ""))
        for m in hparams_plugin_route(logdir, "/experiment", {})["metricInfos"]
    ]
    assert after[: len(before)] == [(m["name"]["tag"], "") for m in before]
    assert after[len(before)] == ("verdict/test/nll", EVAL_RUN)  # evaluate.py's IWAE bound, with its k
