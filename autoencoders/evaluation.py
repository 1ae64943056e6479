"""What `python evaluate.py` does once Hydra has composed conf/evaluate.yaml: find the run(s), rebuild each run's data
from its own saved config and its model from its checkpoint, score it on the test split and write <run>/eval/.

A run is only read: everything goes to <run>/eval/ (metrics.json, config.yaml, PNGs, TensorBoard events), and a sweep's
report to the sweep dir.
"""

import json
import logging
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from yaml import YAMLError

from autoencoders import report
from autoencoders.checkpoints import load
from autoencoders.data import ImageDataModule
from autoencoders.errors import UserError
from autoencoders.losses import reconstruction_nll
from autoencoders.metrics import FeatureNetSettings, FrechetDistance, active_units, feature_net, metric_names
from autoencoders.models import AE, VAE
from autoencoders.pictures import Sampler, picture_grids, save_pictures
from autoencoders.sweeps import FAILURE_FILE, user_error
from autoencoders.training import write_json

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> list[dict]:
    """Score what the config names: one dict of metrics per run (for a sweep, the rows of its report)."""
    check_config(cfg)
    if cfg.sweep_dir is not None:
        return evaluate_sweep(Path(cfg.sweep_dir), cfg)
    if cfg.run_dir is not None:
        return [evaluate_run(Path(cfg.run_dir), cfg)]
    checkpoint = Path(cfg.ckpt_path)
    run_dir = checkpoint.parent.parent  # train.py writes <run>/checkpoints/<name>.ckpt
    if checkpoint.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
        return [evaluate_run(run_dir, cfg, checkpoint)]
    return [score(checkpoint, data_config(None, cfg), checkpoint.parent / f"{checkpoint.stem}_eval", cfg)]


def check_config(cfg: DictConfig) -> None:
    """Reject bad evaluation settings before anything is loaded."""
    given = {key: cfg[key] for key in ("run_dir", "ckpt_path", "sweep_dir") if cfg[key] is not None}
    if len(given) != 1:
        got = f" (got {', '.join(f'{k}={v}' for k, v in given.items())})" if given else ""
        raise UserError(
            f"Say what to evaluate with exactly one of run_dir=<a train.py run folder>, ckpt_path=<a .ckpt file> "
            f"or sweep_dir=<a train.py -m sweep folder>{got}."
        )
    for key in ("batch_size", "k", "k_chunk"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UserError(f"{key}={cfg[key]} must be a positive integer; see conf/evaluate.yaml for the default.")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 0 or cfg.num_samples == 1:
        raise UserError(
            f"num_samples={cfg.num_samples} must be 0 (skip FID) or at least 2 decoded samples, e.g. 10000."
        )
    if cfg.checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint={cfg.checkpoint} is not a checkpoint of a run. Use checkpoint=best or last.")
    if cfg.sort_by not in metric_names(cfg.k):
        raise UserError(f"sort_by={cfg.sort_by} is not a metric. Use one of: {', '.join(metric_names(cfg.k))}.")
    device(cfg.device)


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


# Finding runs, checkpoints and configs -------------------------------------------------------------------------------
def evaluate_sweep(sweep_dir: Path, cfg: DictConfig) -> list[dict]:
    """Score every job of a multirun sweep; jobs that cannot be scored are rows with their reason, not dropped."""
    rows = []
    for run_dir in sweep_jobs(sweep_dir):
        row = report.describe(run_dir)
        if (run_dir / FAILURE_FILE).is_file():
            row["status"] = f"training failed: {json.loads((run_dir / FAILURE_FILE).read_text())['error']}"
        elif not list((run_dir / "checkpoints").glob("*.ckpt")):
            row["status"] = "no checkpoint"
        else:
            try:
                row.update(evaluate_run(run_dir, cfg))
                row["status"] = "ok" if (run_dir / "metrics.json").is_file() else "unfinished training"
            except UserError as e:
                row["status"] = f"error: {e}"
        if row["status"] != "ok":
            log.warning("%s: %s", run_dir.name, row["status"])
        rows.append(row)
    return report.write_report(sweep_dir, rows, cfg.sort_by)


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    if not (sweep_dir / "multirun.yaml").is_file():
        raise UserError(
            f"sweep_dir={sweep_dir} is not a multirun sweep folder (it has no multirun.yaml). Pass the folder that "
            "`python train.py -m ...` created, e.g. outputs/multirun/<time>, or run_dir=<folder> for a single run."
        )
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    if not jobs:
        raise UserError(f"The sweep folder {sweep_dir} holds no job folders yet; wait for train.py -m to start them.")
    return sorted(jobs, key=_job_number)


def _job_number(run_dir: Path) -> tuple[int, str]:
    """Hydra names jobs <num>_<overrides>: sort 2_ before 10_."""
    number = run_dir.name.split("_")[0]
    return (int(number) if number.isdigit() else -1, run_dir.name)


def evaluate_run(run_dir: Path, cfg: DictConfig, checkpoint: Path | None = None) -> dict[str, float]:
    config = run_config(run_dir)
    checkpoint = checkpoint or find_checkpoint(run_dir, cfg.checkpoint)
    return score(checkpoint, data_config(config, cfg), run_dir / "eval", cfg)


def run_config(run_dir: Path) -> DictConfig:
    """The config the run was trained with (<run>/.hydra/config.yaml, as Hydra saved it)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(
            f"Run folder {run_dir} does not exist. Pass run_dir=<a folder that train.py created>, "
            "e.g. outputs/runs/<time>_<overrides>."
        )
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a train.py run folder: it has no .hydra/config.yaml to rebuild the model and data "
            "from. Pass the run's own folder, or score a lone checkpoint with ckpt_path=<file.ckpt> data=<dataset>."
        )
    try:
        config = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException) as e:
        raise UserError(f"{path} is not a readable config ({e}). Restore it from the run's original folder.") from None
    if not isinstance(config, DictConfig) or "data" not in config:
        raise UserError(f"{path} holds no data config, so it was not written by this project's train.py.")
    return config


def find_checkpoint(run_dir: Path, which: str) -> Path:
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt" if which == "best" else "last.ckpt"))
    if not found:
        other = "last" if which == "best" else "best"
        raise UserError(
            f"{run_dir} has no {which} checkpoint in checkpoints/ (training may have stopped early). "
            f"Try checkpoint={other}, or pass ckpt_path=<file.ckpt>."
        )
    return found[-1]  # top-1 checkpointing keeps one best; if several, the newest epoch


def data_config(run: DictConfig | None, cfg: DictConfig) -> DictConfig:
    """The run's own data config. An evaluation override replaces it when it is a whole data config (`data=<name>`),
    or changes keys in it (`+data.<key>=<value>`). Interpolations such as ${seed} resolve against the run's config,
    so the split is the one the run was trained on."""
    override = cfg.get("data")
    if run is None:
        if override is None or "_target_" not in override:
            raise UserError(
                f"ckpt_path={cfg.ckpt_path} is not inside a train.py run folder, so its data config is unknown. "
                "Name the data to score on, e.g. data=mnist_subset (see conf/data/)."
            )
        return override
    if override is not None:
        whole = "_target_" in override
        run.data = OmegaConf.to_container(override) if whole else OmegaConf.merge(run.data, override)
    return run.data


def build_data(config: DictConfig) -> ImageDataModule:
    try:
        data = instantiate(config)
    except InstantiationException as e:
        raise user_error(e) or UserError(f"Could not build the data ({e}). Check the data.* overrides.") from None
    data.setup("test")
    return data


# Scoring ---------------------------------------------------------------------------------------------------------
def score(checkpoint: Path, data_cfg: DictConfig, out_dir: Path, cfg: DictConfig) -> dict[str, float]:
    """Score one checkpoint on the test split of `data_cfg`; writes out_dir/metrics.json, pictures and events."""
    log.info("Scoring %s", checkpoint)
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
    torch.manual_seed(cfg.seed)
    test_images = data.test_set.tensors[0]
    metrics = reconstruction_metrics(model, test_images, cfg.batch_size)
    if isinstance(model, VAE):
        metrics |= vae_metrics(model, test_images, cfg.k, cfg.k_chunk, cfg.batch_size)
    draw = samplers(model, data.train_set.tensors[0], cfg.batch_size)
    if cfg.num_samples:
        metrics |= fid_metrics(draw, data, cfg)
    grids = picture_grids(model, test_images, draw, cfg.seed, **cfg.images)

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("events.out.tfevents.*"):  # a new evaluation replaces the old one in TensorBoard
        old.unlink()
    with SummaryWriter(out_dir) as writer:
        save_pictures(grids, out_dir, writer)
        for name, value in metrics.items():
            writer.add_scalar(name, value)
    settings = OmegaConf.to_container(cfg, resolve=True) | {"checkpoint_file": str(checkpoint)}
    OmegaConf.save(settings | {"data": OmegaConf.to_container(data_cfg, resolve=True)}, out_dir / "config.yaml")
    write_json(out_dir / "metrics.json", metrics)
    log.info("Wrote %s:\n%s", out_dir, "\n".join(f"  {name}: {value:.6g}" for name, value in metrics.items()))
    return metrics


def _batches(images: Tensor, batch_size: int, model: AE):
    return (batch.to(model.device) for batch in images.split(batch_size))


@torch.no_grad()
def reconstruction_metrics(model: AE, images: Tensor, batch_size: int) -> dict[str, float]:
    """MSE per pixel and BCE in nats per image of decode(encode(x)), for every model whatever its training loss."""
    squared_error = bce = 0.0
    for x in _batches(images, batch_size, model):
        logits = model.decoder(model.encode(x))
        squared_error += (torch.sigmoid(logits) - x).pow(2).sum().item()
        bce += reconstruction_nll(logits, x, "bce").sum().item()
    return {"test/bce": bce / len(images), "test/mse": squared_error / images.numel()}


@torch.no_grad()
def vae_metrics(model: VAE, images: Tensor, k: int, k_chunk: int, batch_size: int) -> dict[str, float]:
    """ELBO, its terms and the k-sample IWAE bound in nats per image (means over the images), and active units."""
    recon, kl, iwae, means = [], [], [], []
    for x in _batches(images, batch_size, model):
        r, d = model.elbo_terms(x)
        recon.append(r)
        kl.append(d)
        iwae.append(model.log_likelihood(x, k, k_chunk))
        means.append(model.posterior(x)[0])
    recon, kl = torch.cat(recon), torch.cat(kl)
    return {
        "test/elbo": -(recon + kl).mean().item(),
        f"test/iwae_k{k}": torch.cat(iwae).mean().item(),
        "test/recon": recon.mean().item(),
        "test/kl": kl.mean().item(),
        "test/active_units": active_units(torch.cat(means)),
    }


@torch.no_grad()
def samplers(model: AE, train_images: Tensor, batch_size: int) -> dict[str, Sampler]:
    """`prior` decodes z ~ N(0, I). A plain AE has no prior of its own, so it also gets `gaussian`: decoded z from a
    full-covariance Gaussian fitted to its codes of the training images."""
    found: dict[str, Sampler] = {"prior": model.sample}
    if not isinstance(model, VAE):
        codes = torch.cat([model.encode(x) for x in _batches(train_images, batch_size, model)])
        mean = codes.mean(0)
        scale = torch.linalg.cholesky(codes.T.cov() + 1e-6 * torch.eye(len(mean), device=mean.device))

        def gaussian(n: int, generator: torch.Generator) -> Tensor:
            return model.decode(mean + torch.randn(n, len(mean), generator=generator).to(mean.device) @ scale.T)

        found["gaussian"] = gaussian
    return found


def fid_metrics(draw: dict[str, Sampler], data: ImageDataModule, cfg: DictConfig) -> dict[str, float]:
    """FID of `num_samples` images from each sampler against the test images, beside the feature net's accuracy."""
    if data.num_classes < 2:
        raise UserError(
            "FID needs a classifier to supply its features, but this data has a single class (a flat image folder?). "
            "Put the images in one sub-folder per class, or pass num_samples=0 to skip FID."
        )
    net, accuracy = feature_net(data, FeatureNetSettings(**cfg.fid), cfg.cache_dir, device(cfg.device))
    fid = FrechetDistance(net, data.test_set.tensors[0], cfg.batch_size)
    sizes = [min(cfg.batch_size, cfg.num_samples - i) for i in range(0, cfg.num_samples, cfg.batch_size)]
    metrics = {}
    for name, sample in draw.items():
        generator = torch.Generator().manual_seed(cfg.seed)
        metrics[f"test/fid_{name}"] = fid.score(sample(n, generator) for n in sizes)  # sampled under score's no_grad
    return metrics | {"test/fid_net_accuracy": accuracy}
