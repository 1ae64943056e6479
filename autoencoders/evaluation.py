"""What `python evaluate.py` does once Hydra has composed conf/evaluate.yaml: find the run(s), rebuild each run's data
from its own saved config (both in saved_runs.py) and its model from its checkpoint, score it on a held-out split and
write its results.

A run's own files are only read: each (checkpoint, split, data, settings) evaluation gets its own folder,
<run>/eval/<checkpoint>_<split>_<data>_<settings>/ (metrics.json, config.yaml, PNGs and report.html), where
<settings> hashes every evaluate setting that changes the numbers or pictures (SCORED_SETTINGS); the latest of them
go to TensorBoard as the run <run>/eval (loggers.record_evaluations), the HParams record of the run, or of its sweep,
is rewritten to list them, and a sweep's report goes to the sweep dir.
A sweep is scored on both held-out splits and ranked on validation only; its test columns are reported, never used
to choose.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from autoencoders import report
from autoencoders.checkpoints import load, read_checkpoint
from autoencoders.config import check_chosen_on_validation, check_settings
from autoencoders.console import SPLITS, metrics_table
from autoencoders.data import ImageDataModule, to_unit_float
from autoencoders.errors import UserError
from autoencoders.files import check_replaceable, name_in_error, replace_folder, save_cache, write_json
from autoencoders.jobs import FINISHED, RUNNING, job_status
from autoencoders.likelihoods import bits_per_dim, for_data
from autoencoders.loggers import jobs_under, record_evaluated_run, record_evaluations, record_sweep
from autoencoders.metrics import (
    COUNTS,
    METRICS,
    FeatureNetSettings,
    SampleQuality,
    accuracy,
    active_units,
    feature_net,
    metric_key,
)
from autoencoders.models import AE, VAE, VQVAE
from autoencoders.models.vq import Quantised
from autoencoders.pictures import ImageSampler, picture_grids, save_pictures
from autoencoders.samplers import CACHE_VERSION, Sampler, make_sampler
from autoencoders.saved_runs import (
    NOT_SCORED,
    build_data,
    crashed_note,
    data_config,
    find_checkpoint,
    run_config,
    scoring_status,
    sweep_jobs,
)

log = logging.getLogger(__name__)

# The evaluate settings that change the numbers or pictures, hashed into each evaluation's folder name (checkpoint,
# split and data are in the name already; device, batch_size, k_chunk, cache_dir and sort_by change none of them).
SCORED_SETTINGS = ("seed", "k", "samplers", "gmm_components", "num_samples", "kid_subsets", "fid", "images")


def evaluate(cfg: DictConfig) -> list[dict]:
    """Score what the config names: one dict of metrics per run (for a sweep, the rows of its report)."""
    check_config(cfg)
    if cfg.sweep_dir is not None:
        return evaluate_sweep(Path(cfg.sweep_dir), cfg)
    if cfg.run_dir is not None:
        rows = [evaluate_run(Path(cfg.run_dir), cfg, cfg.split)]
        record_evaluated_run(Path(cfg.run_dir))  # its HParams session shows them
        return rows
    checkpoint = Path(cfg.ckpt_path)
    run_dir = checkpoint.parent.parent  # train.py writes <run>/checkpoints/<name>.ckpt
    if checkpoint.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
        status = job_status(run_dir)
        if status.state == RUNNING:  # refused; a failed run's checkpoint named on purpose is scored
            scoring_status(run_dir)
        rows = [evaluate_run(run_dir, cfg, cfg.split, checkpoint, crashed_note(status, checkpoint))]
        record_evaluated_run(run_dir)
        return rows
    data_cfg = data_config(None, cfg)
    return [score(checkpoint, data_cfg, cfg.split, checkpoint.parent / f"{checkpoint.stem}_eval", cfg)]


def check_config(cfg: DictConfig) -> None:
    """Reject bad evaluation settings before anything is loaded."""
    given = {key: cfg[key] for key in ("run_dir", "ckpt_path", "sweep_dir") if cfg[key] is not None}
    if len(given) != 1:
        got = f" (got {', '.join(f'{k}={v}' for k, v in given.items())})" if given else ""
        raise UserError(
            f"Say what to evaluate with exactly one of run_dir=<a train.py run folder>, ckpt_path=<a .ckpt file> "
            f"or sweep_dir=<a train.py -m sweep folder>{got}."
        )
    check_settings(cfg)  # every setting against its range (config.py)
    check_sort_by(cfg.sort_by)
    device(cfg.device)


def check_sort_by(sort_by: str) -> None:
    """A sweep is ranked on a validation metric of METRICS: ranking on test would choose a model on the test split."""
    try:
        key = metric_key(sort_by.partition("/")[2])
    except KeyError:
        key = None
    if key is None or key in COUNTS:  # a count says how many images FID used: it ranks nothing
        names = ", ".join(f"val/{key}" for key in METRICS if key not in COUNTS)
        raise UserError(f"sort_by={sort_by} is not a score to rank on. Use one of: {names}.")
    check_chosen_on_validation("sort_by", sort_by, "val/fid_prior")


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device. Use auto, cpu, cuda or cuda:<index>.") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}, but PyTorch sees no CUDA GPU here. Use device=cpu (or auto).")
    return found


# Sweeps and runs ---------------------------------------------------------------------------------------------------
def evaluate_sweep(sweep_dir: Path, cfg: DictConfig) -> list[dict]:
    """Score every job of a multirun sweep on both held-out splits; jobs that cannot be scored are rows with their
    reason, not dropped."""
    rows, scored = [], set()
    jobs = sweep_jobs(sweep_dir)
    report.check_writable(sweep_dir)
    if jobs[0].parent != sweep_dir:
        log.info(
            "sweep_dir=%s is a transfer study: scoring its %d pretrained autoencoders (%s/*); its classifiers' test "
            "accuracy is in transfer.md", sweep_dir, len(jobs), jobs[0].parent.name
        )  # fmt: skip
    for run_dir in jobs:
        row, status = report.describe(run_dir), job_status(run_dir)
        row["run"] = str(run_dir.relative_to(sweep_dir))
        if status.state in NOT_SCORED:  # as run_dir= refuses it (saved_runs.scoring_status)
            row["status"] = str(status)
        elif not list((run_dir / "checkpoints").glob("*.ckpt")):
            row["status"] = f"{status}; it saved no checkpoint"
        else:
            try:
                checkpoint = find_checkpoint(run_dir, cfg.checkpoint)
                for split in SPLITS:
                    row.update(evaluate_run(run_dir, cfg, split, checkpoint, crashed_note(status, checkpoint)))
                data_cfg = data_config(run_config(run_dir), cfg)  # the pictures of the split the rows are ranked on
                shown = evaluation_dir(checkpoint, data_cfg, SPLITS[0], run_dir / "eval", cfg)
                row["evaluation"] = str(shown.relative_to(sweep_dir))
                row["status"] = "ok" if status.state == FINISHED else crashed_note(status, checkpoint)
                scored.add(row["run"])
            except UserError as e:
                row["status"] = f"error: {e}"
        if row["status"] != "ok":
            log.warning("%s: %s", row["run"], row["status"])
        rows.append(row)
    failed = [f"  {row['run']}: {row['status']}" for row in rows if row["run"] not in scored]
    caveats = [f"  {row['run']}: {row['status']}" for row in rows if row["run"] in scored and row["status"] != "ok"]
    kept = report.scored_runs(sweep_dir)
    if len(scored) < kept:
        raise UserError(
            f"{len(failed)} of the {len(rows)} jobs in {sweep_dir} could not be scored, so the previous summary.csv "
            f"and summary.md, which score {kept}, were kept as they were:\n" + "\n".join(failed)
        )
    rows = report.write_report(sweep_dir, rows, cfg.sort_by)
    record_sweep(sweep_dir, jobs_under(sweep_dir))  # the HParams tab lists evaluate.py's metrics beside the rest
    if caveats:
        log.warning(
            "%d of the %d jobs in %s stopped before they finished; the checkpoints they left are scored, and the "
            "report says so in their status:\n%s", len(caveats), len(rows), sweep_dir, "\n".join(caveats)
        )  # fmt: skip
    if failed:
        raise UserError(
            f"{len(failed)} of the {len(rows)} jobs in {sweep_dir} could not be scored; the report lists them with "
            "their status beside the others:\n" + "\n".join(failed)
        )
    return rows


def evaluate_run(
    run_dir: Path, cfg: DictConfig, split: str, checkpoint: Path | None = None, note: str | None = None
) -> dict[str, float]:
    """Score a run's checkpoint; without `checkpoint`, its `cfg.checkpoint` one under the one rule of run_dir= and
    sweep_dir= (saved_runs.scoring_status); `note`, a crashed run's status, goes to the console and the report."""
    config = run_config(run_dir)
    if checkpoint is None:
        status = scoring_status(run_dir)
        checkpoint = find_checkpoint(run_dir, cfg.checkpoint)
        note = crashed_note(status, checkpoint)
    if note:
        log.warning("%s: %s", run_dir.name, note)
    data_cfg = data_config(config, cfg)
    return score(checkpoint, data_cfg, split, run_dir / "eval", cfg, note, check_data=cfg.get("data") is None)


# Scoring ---------------------------------------------------------------------------------------------------------
def score(
    checkpoint: Path,
    data_cfg: DictConfig,
    split: str,
    eval_dir: Path,
    cfg: DictConfig,
    note: str | None = None,
    check_data: bool = False,
) -> dict[str, float]:
    """Score one checkpoint on `split` of `data_cfg`; writes metrics.json, config.yaml, pictures and events into its
    own folder under `eval_dir`, replacing only an earlier run of the same evaluation. `note` (a crashed run's status)
    heads its report; with `check_data`, data that differ from the checkpoint's fingerprint of them are refused."""
    out_dir = evaluation_dir(checkpoint, data_cfg, split, eval_dir, cfg)
    check_replaceable(out_dir)  # an earlier evaluation's, replaced at the end: a file of yours in it stops it now
    log.info("Scoring %s on the %s split", checkpoint, split)
    model = load(checkpoint)
    if not isinstance(model, AE):
        raise UserError(
            f"{checkpoint} holds a {type(model).__name__}, not an autoencoder; evaluate.py scores AE and VAE runs."
        )
    model = model.to(device(cfg.device))
    data = build_data(data_cfg)
    if model.image_shape != data.image_shape:
        shape = "x".join(map(str, model.image_shape))
        raise UserError(
            f"{checkpoint} was trained on {shape} images, but the data to score holds "
            f"{'x'.join(map(str, data.image_shape))} images. Score it on data of the shape it was trained on "
            f"(drop the data override, or choose a dataset of {shape} images)."
        )
    if check_data:
        check_fingerprint(checkpoint, data, eval_dir.parent)
    for_data(model.hparams.likelihood, data.hparams.binarize)  # e.g. a Bernoulli model on grey images: an error
    torch.manual_seed(cfg.seed)
    images = getattr(data, f"{split}_set").images  # uint8, made float one batch at a time
    started = time.monotonic()

    def stage(text: str, *args: Any) -> None:  # the console hears of every step that takes seconds
        log.info(f"  [%3.0f s] {text}", time.monotonic() - started, *args)

    stage("reconstructions of the %d images", len(images))
    metrics = reconstruction_metrics(model, images, cfg.batch_size)
    if bounds_images(model):
        stage("nll: the IWAE bound with k=%d samples per image", cfg.k)
        metrics |= vae_metrics(model, images, cfg.k, cfg.k_chunk, cfg.batch_size)
    if isinstance(model, VQVAE):
        metrics |= codebook_metrics(model, images, cfg.batch_size)
    factors = data.factors(split)
    if factors is not None:
        stage("disentanglement: the codes against the %s factors", ", ".join(data.factor_names))
        metrics |= factor_metrics(model, images, factors, cfg.batch_size, cfg.seed)
    data_key = data_name(data_cfg, checkpoint)  # the sampler cache's key too
    samplers = [name for name in cfg.samplers if name != "pixelcnn" or isinstance(model, Quantised)]
    if len(samplers) < len(cfg.samplers):
        log.info("No pixelcnn sampler for this %s: it fits a prior over tokens (vqvae, fsq)", type(model).__name__)
    stage("samplers: %s (fitted to the training codes, or read from the cache)", ", ".join(samplers))
    draw = fitted_samplers(model, data, data_key, checkpoint, samplers, cfg)
    if cfg.num_samples != 0:
        stage("FID and KID of each sampler and of the real %s images", split)
        metrics |= sample_metrics(draw, data, split, cfg)
    metrics = {f"{split}/{name}": value for name, value in metrics.items()}
    stage("pictures")
    grids = picture_grids(model, images, draw, cfg.seed, **cfg.images)

    staging = eval_dir / f".{out_dir.name}.{os.getpid()}.part"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_pictures(grids, staging)  # TensorBoard's record of them and of the metrics: record_evaluations
        settings = OmegaConf.to_container(cfg, resolve=True) | {"checkpoint_file": str(checkpoint), "split": split}
        settings |= {"run_status": note} if note else {}
        OmegaConf.save(settings | {"data": OmegaConf.to_container(data_cfg, resolve=True)}, staging / "config.yaml")
        write_json(staging / "metrics.json", metrics)
        facts = run_report(checkpoint, model, split, data_key, cfg)
        report.write_run_html(staging / "report.html", facts, metrics, list(grids), note)
        replace_folder(staging, out_dir)
    except BaseException as e:  # a half-written evaluation never stays behind
        shutil.rmtree(staging, ignore_errors=True)
        name_in_error(e, out_dir)  # e.g. TensorBoard's writer thread on a full disk, which names no file
        raise
    record_evaluations(eval_dir)
    log.info("Scored %s on %s; wrote %s:\n%s", checkpoint.name, split, out_dir, metrics_table(metrics))
    return metrics


def check_fingerprint(checkpoint: Path, data: ImageDataModule, run_dir: Path) -> None:
    """Refuse data that differ from those the run trained on (ImageDataModule.fingerprint, in its checkpoints): an
    image folder changed since is split anew, so its held-out split is no longer the run's."""
    saved = read_checkpoint(checkpoint).get(ImageDataModule.__qualname__) or {}
    if "fingerprint" not in saved or saved.get("source") != data.source.identity:
        return  # a checkpoint from before fingerprints, or data named by an evaluation override
    if saved["fingerprint"] != data.fingerprint():
        raise UserError(
            f"The data of run {run_dir} changed since it trained: {data.source.identity} no longer holds the images "
            f"{checkpoint.name} was trained and split on (fingerprint {saved['fingerprint']}, now "
            f"{data.fingerprint()}), so its val and test splits would not be the run's. Restore the data as it was, "
            "or train the run again on the data as they are now."
        )


def run_report(checkpoint: Path, model: AE, split: str, data_key: str, cfg: DictConfig) -> dict[str, str]:
    """What heads an evaluation's report.html: the model, split, data, checkpoint and the settings it was scored
    with (SCORED_SETTINGS)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    latent_dim = model.hparams.get("latent_dim")
    title = f"{type(model).__name__}{f' (latent_dim={latent_dim})' if latent_dim else ''} on the {split} split"
    return {
        "title": f"{title} of {data_key}: {checkpoint.name}",
        "model": type(model).__name__,
        "split": split,
        "data": data_key,
        "checkpoint": str(checkpoint),
        "settings": " ".join(f"{key}={json.dumps(resolved[key], separators=(',', ':'))}" for key in SCORED_SETTINGS),
    }


def evaluation_dir(checkpoint: Path, data_cfg: DictConfig, split: str, eval_dir: Path, cfg: DictConfig) -> Path:
    """The folder of one evaluation: <checkpoint>_<split>_<data>_<settings> under `eval_dir`."""
    return eval_dir / f"{checkpoint.stem}_{split}_{data_name(data_cfg, checkpoint)}_{settings_name(cfg)}"


def data_name(data_cfg: DictConfig, checkpoint: Path) -> str:
    """`<data choice>-<hash of the resolved data config>`: one name per dataset and split settings."""
    choice = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    if choice is None:
        hydra_file = checkpoint.parent.parent / ".hydra" / "hydra.yaml"
        saved = OmegaConf.load(hydra_file) if hydra_file.is_file() else None
        choice = OmegaConf.select(saved, "hydra.runtime.choices.data") if saved is not None else None
    resolved = json.dumps(OmegaConf.to_container(data_cfg, resolve=True), sort_keys=True, default=str)
    return f"{choice or 'data'}-{hashlib.blake2b(resolved.encode(), digest_size=4).hexdigest()}"


def settings_name(cfg: DictConfig) -> str:
    """A short hash of the SCORED_SETTINGS: evaluations that differ in them get folders of their own."""
    scored = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in SCORED_SETTINGS}
    return hashlib.blake2b(json.dumps(scored, sort_keys=True).encode(), digest_size=4).hexdigest()


def _batches(images: Tensor, batch_size: int, model: AE):
    """uint8 images as float batches in [0, 1] on the model's device: one batch's float copy at a time."""
    return (to_unit_float(batch.to(model.device)) for batch in images.split(batch_size))


@torch.no_grad()
def reconstruction_metrics(model: AE, images: Tensor, batch_size: int) -> dict[str, float]:
    """Squared error per pixel of the mean reconstruction, for every model, and for plain AEs the reconstruction NLL
    under the model's likelihood, in nats per image (a VAE's `recon` comes with its ELBO)."""
    squared_error = nll = 0.0
    for x in _batches(images, batch_size, model):
        params = model.decoder_params(x)  # one decoding serves both numbers (a VQ-VAE's of its quantised code)
        squared_error += (model.likelihood.mean(params) - x).pow(2).sum().item()
        nll += model.likelihood.nll(params, x).sum().item()
    metrics = {"mse": squared_error / images.numel()}
    return metrics if bounds_images(model) else metrics | {"recon": nll / len(images)}


def bounds_images(model: AE) -> bool:
    """Whether the model has an ELBO and importance-weighted bound on log p(x) of images (a VAE's; not M1+M2's)."""
    return isinstance(model, VAE) and model.bounds_images


@torch.no_grad()
def vae_metrics(model: VAE, images: Tensor, k: int, k_chunk: int, batch_size: int) -> dict[str, float]:
    """ELBO, its terms and the k-sample IWAE bound on -log p(x) in nats per image (means over the images), the latter
    in bits per dimension too (discrete likelihoods only), and active units."""
    recon, kl, log_px, means = [], [], [], []
    for x in _batches(images, batch_size, model):
        r, d = model.elbo_terms(x)
        recon.append(r)
        kl.append(d)
        log_px.append(model.log_likelihood(x, k, k_chunk))
        means.append(model.posterior(x)[0])
    recon, kl, nll = torch.cat(recon), torch.cat(kl), -torch.cat(log_px).mean()
    metrics = {
        "nll": nll.item(),
        "nll_k": k,  # train.py's test/nll uses model.nll_samples instead: the key says which
        "elbo": -(recon + kl).mean().item(),
        "recon": recon.mean().item(),
        "kl": kl.mean().item(),
        "active_units": active_units(torch.cat(means)),
    }
    if model.likelihood.discrete:  # bits per dimension of a probability mass; a density's is no code length
        metrics["bpd"] = bits_per_dim(nll, images[0].numel()).item()
    return metrics


@torch.no_grad()
def codebook_metrics(model: VQVAE, images: Tensor, batch_size: int) -> dict[str, float]:
    """The codebook's perplexity and usage over all the split's tokens (VQVAE.codebook_use)."""
    tokens = torch.cat([model.tokens(model.encode(x)).flatten() for x in _batches(images, batch_size, model)])
    return {name: value.item() for name, value in model.codebook_use(tokens).items()}


@torch.no_grad()
def fitted_samplers(
    model: AE, data: ImageDataModule, data_key: str, checkpoint: Path, names: list[str], cfg: DictConfig
) -> dict[str, ImageSampler]:
    """The samplers `names` as image samplers, those other than `prior` fitted to the codes of the training images
    (binarised as the model saw them), cached in <cache_dir>/samplers/ under a hash of the checkpoint's bytes, the
    data (`data_key`, its data_name) and the settings."""
    found: dict[str, ImageSampler] = {}
    codes = None
    identity = sampler_identity(checkpoint, data_key, cfg)
    for name in names:
        sampler = new_sampler(model, name, cfg)
        cache = Path(cfg.cache_dir).expanduser() / "samplers" / f"{checkpoint.stem}_{name}_{identity}.pt"
        if sampler.needs_fit and cache.is_file():
            sampler.load_state_dict(torch.load(cache, weights_only=True))
        elif sampler.needs_fit:
            if codes is None:
                batches = _batches(data.train_set.images, cfg.batch_size, model)
                if data.hparams.binarize == "dynamic":  # one fixed binary draw of the grey training images
                    generator = torch.Generator(model.device).manual_seed(0)
                    batches = (torch.bernoulli(x, generator=generator) for x in batches)
                codes = torch.cat([model.encode(x) for x in batches])
            save_cache(sampler.fit(codes).state_dict(), cache, f"the fitted {name} sampler")
        found[name] = functools.partial(model.sample, sampler=sampler)
    return found


@torch.no_grad()
def factor_metrics(model: AE, images: Tensor, factors: Tensor, batch_size: int, seed: int) -> dict[str, float]:
    """MIG, DCI, SAP and the FactorVAE score (disentanglement.py) of the codes of `images` against their known
    factors; none for a code of one number, which they cannot be computed for."""
    if model.code_dim < 2:
        log.info("No disentanglement scores: they need codes of at least 2 numbers (this model's have 1)")
        return {}
    from autoencoders.disentanglement import disentanglement_metrics  # scikit-learn loads only for data with factors

    codes = torch.cat([model.encode(x).cpu() for x in _batches(images, batch_size, model)])
    return disentanglement_metrics(codes, factors, seed)


def new_sampler(model: AE, name: str, cfg: DictConfig) -> Sampler:
    """The unfitted sampler `name` of evaluate.py's `samplers` for `model`."""
    if name == "prior":
        return model.prior_sampler()
    if name == "pixelcnn":
        return model.pixelcnn_sampler(cfg.seed)
    return make_sampler(name, model.code_dim, cfg.gmm_components, cfg.seed)


def sampler_identity(checkpoint: Path, data_key: str, cfg: DictConfig) -> str:
    """What a fitted sampler depends on: the checkpoint's bytes, the data, the settings, and the sampler code's cache
    version and torch version."""
    identity = hashlib.blake2b(checkpoint.read_bytes(), digest_size=8)
    identity.update(f"{data_key}-{cfg.gmm_components}-{cfg.seed}-v{CACHE_VERSION}-torch{torch.__version__}".encode())
    return identity.hexdigest()


def sample_metrics(
    draw: dict[str, ImageSampler], data: ImageDataModule, split: str, cfg: DictConfig
) -> dict[str, float]:
    """FID and KID of each sampler's decoded images against the split's real images, beside the floor (as many
    training images, drawn at random, against the same) and the feature net's accuracy on the split; with the counts
    (fid_samples, fid_real) that say what they are."""
    if data.num_classes < 2:
        raise UserError(
            "FID needs a classifier to supply its features, but this data has a single class (a flat image folder?). "
            "Put the images in one sub-folder per class, or pass num_samples=0 to skip FID and KID."
        )
    real, labels = data.real_split(split)
    train = data.real_split("full_train")[0]
    n = cfg.num_samples or min(len(real), len(train))
    if n > len(train):  # the floor scores n training images
        raise UserError(
            f"num_samples={n} is more than the {len(train)} training images, which fid_floor and kid_floor are "
            f"measured with. Use num_samples=null (as many as the {split} split's {len(real)} images) or "
            f"num_samples<={len(train)}."
        )
    net = feature_net(data, FeatureNetSettings(**cfg.fid), cfg.cache_dir, device(cfg.device))
    log.info("FID/KID from %d samples per sampler against the %d %s images", n, len(real), split)
    quality = SampleQuality(net, real, n, cfg.batch_size, cfg.kid_subsets)
    sizes = [min(cfg.batch_size, n - i) for i in range(0, n, cfg.batch_size)]
    metrics = {}
    for name, sample in draw.items():
        generator = torch.Generator().manual_seed(cfg.seed)
        scores = quality.score((sample(size, generator) for size in sizes), cfg.seed)  # under score's no_grad
        metrics |= {f"fid_{name}": scores["fid"], f"kid_{name}": scores["kid"], f"kid_{name}_std": scores["kid_std"]}
    drawn = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:n]  # train is by class
    floor = quality.score(train[drawn].split(cfg.batch_size), cfg.seed)
    metrics |= {"fid_floor": floor["fid"], "kid_floor": floor["kid"], "kid_floor_std": floor["kid_std"]}
    metrics |= {"fid_samples": n, "fid_real": len(real)}
    return metrics | {"fid_net_accuracy": accuracy(net, real, labels)}
