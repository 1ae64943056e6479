"""Autoencoders: a Lightning + Hydra experiment framework. Heavy imports happen on first use, not at import."""

from omegaconf import OmegaConf

from autoencoders import config, reference
from autoencoders.rundirs import attempt_subdir, job_log, run_name

config.register()  # the schemas of conf/*.yaml (autoencoders/config.py), before Hydra composes a config

# conf/train.yaml's run and job dir names, and where each attempt's config and log go (autoencoders/rundirs.py)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("attempt_subdir", attempt_subdir, replace=True, use_cache=True)
OmegaConf.register_new_resolver("job_log", job_log, replace=True, use_cache=True)
OmegaConf.register_new_resolver("gpu_precision", config.gpu_precision, replace=True)  # conf/trainer/gpu.yaml
OmegaConf.register_new_resolver("reference", reference.help_text, replace=True)  # --help: conf/hydra/help/


def load(path):
    """Rebuild the right LightningModule (AE, VAE, ...) for any checkpoint written by train.py, for inference."""
    from autoencoders.checkpoints import load

    return load(path)
