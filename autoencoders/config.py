"""The types of the configs, as structured configs in Hydra's ConfigStore: Hydra checks every value against them when
it composes the config, before train.py or evaluate.py imports torch, and refuses e.g. `latent_dim=abc` or
`compile=maybe` naming the key.

The values themselves, with their comments, live in conf/*.yaml only; each yaml starts from its schema (its defaults
list) and sets every field. Schemas cover the top-level keys and this project's own classes (data, models). The
trainer, logger, callbacks, optimizer and scheduler groups configure Lightning's and torch's classes, which check
their own arguments, and stay open so that any of those arguments can be added (`+trainer.gradient_clip_val=1`).
Ranges (a positive latent_dim, a known likelihood) are checked where the values are used, with a message that says
what to set instead."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainConfig:  # conf/train.yaml
    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    seed: int = MISSING
    latent_dim: int = MISSING
    kl_weight: float = MISSING
    images_every_n_epochs: int = MISSING
    compile: bool = MISSING
    checkpoint_every_s: float = MISSING
    ckpt_path: str | None = MISSING
    encoder_ckpt: str | None = MISSING
    objective: str | None = MISSING
    selection: str = MISSING


@dataclass
class FIDConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    num_features: int = MISSING
    seed: int = MISSING


@dataclass
class PicturesConfig:
    num_images: int = MISSING
    num_samples: int = MISSING
    num_pairs: int = MISSING
    steps: int = MISSING
    traversal_dims: int = MISSING


@dataclass
class EvaluateConfig:  # conf/evaluate.yaml
    data: Any = None
    run_dir: str | None = MISSING
    ckpt_path: str | None = MISSING
    sweep_dir: str | None = MISSING
    checkpoint: str = MISSING
    split: str = MISSING
    seed: int = MISSING
    device: str = MISSING
    batch_size: int = MISSING
    k: int = MISSING
    k_chunk: int = MISSING
    samplers: list[str] = MISSING
    gmm_components: int = MISSING
    num_samples: int | None = MISSING
    kid_subsets: int = MISSING
    sort_by: str = MISSING
    cache_dir: str = MISSING
    fid: FIDConfig = MISSING
    images: PicturesConfig = MISSING


@dataclass
class DataConfig:  # conf/data/*.yaml: autoencoders.data.ImageDataModule
    _target_: str = MISSING
    source: Any = MISSING  # a Source of data.py, each with its own arguments
    batch_size: int = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    labels_per_class: int | None = MISSING
    val_labels_per_class: int | None = MISSING
    probe_labels_per_class: int = MISSING
    split_seed: int = MISSING
    seed: int = MISSING
    binarize: str | None = MISSING
    device_cap_gb: float = MISSING


@dataclass
class AEConfig:  # conf/model/ae.yaml, conv_ae.yaml: autoencoders.models.AE
    _target_: str = MISSING
    latent_dim: int = MISSING
    arch: str = MISSING
    widths: list[int] | None = MISSING
    likelihood: str | None = MISSING


@dataclass
class VAEConfig(AEConfig):  # conf/model/vae.yaml, conv_vae.yaml: autoencoders.models.VAE
    kl_weight: float = MISSING
    kl_schedule: str = MISSING
    kl_warmup_epochs: int = MISSING
    kl_cycles: int = MISSING
    nll_samples: int = MISSING


@dataclass
class DAEConfig(AEConfig):  # conf/model/dae.yaml: autoencoders.models.DAE
    corruption: str = MISSING
    noise: float = MISSING


@dataclass
class SparseAEConfig(AEConfig):  # conf/model/sparse_ae.yaml: autoencoders.models.SparseAE
    sparsity: float = MISSING


@dataclass
class WAEConfig(AEConfig):  # conf/model/wae.yaml: autoencoders.models.WAE
    mmd_weight: float = MISSING


@dataclass
class IWAEConfig(AEConfig):  # conf/model/iwae.yaml: autoencoders.models.IWAE
    k: int = MISSING
    nll_samples: int = MISSING


@dataclass
class BetaTCVAEConfig(VAEConfig):  # conf/model/beta_tcvae.yaml: autoencoders.models.BetaTCVAE
    tc_weight: float = MISSING


@dataclass
class VQVAEConfig(AEConfig):  # conf/model/vqvae.yaml: autoencoders.models.VQVAE
    codebook_size: int = MISSING
    embedding_dim: int = MISSING
    commitment: float = MISSING
    ema: bool = MISSING
    decay: float = MISSING
    codebook_init: str = MISSING
    revive_below: float = MISSING


@dataclass
class RAEConfig(AEConfig):  # conf/model/rae.yaml: autoencoders.models.RAE
    embedding_weight: float = MISSING
    decoder_weight: float = MISSING


@dataclass
class AAEConfig(AEConfig):  # conf/model/aae.yaml: autoencoders.models.AAE
    adversarial_weight: float = MISSING
    discriminator_lr: float = MISSING
    discriminator_width: int = MISSING


@dataclass
class InfoVAEConfig(VAEConfig):  # conf/model/info_vae.yaml: autoencoders.models.InfoVAE
    alpha: float = MISSING
    mmd_weight: float = MISSING


@dataclass
class VampVAEConfig(VAEConfig):  # conf/model/vamp.yaml: autoencoders.models.VampVAE
    pseudo_inputs: int = MISSING


@dataclass
class IAFVAEConfig(VAEConfig):  # conf/model/vae_iaf.yaml: autoencoders.models.IAFVAE
    flow_steps: int = MISSING
    flow_widths: list[int] = MISSING


@dataclass
class HVAEConfig(VAEConfig):  # conf/model/hvae.yaml: autoencoders.models.HVAE
    top_latent_dim: int | None = MISSING
    hidden: int = MISSING


@dataclass
class FactorVAEConfig(VAEConfig):  # conf/model/factor_vae.yaml: autoencoders.models.FactorVAE
    tc_weight: float = MISSING
    discriminator_lr: float = MISSING
    discriminator_width: int = MISSING


@dataclass
class FSQVAEConfig(AEConfig):  # conf/model/fsq.yaml: autoencoders.models.FSQVAE
    levels: int = MISSING
    decoder_warmup_steps: int = MISSING


@dataclass
class M2Config(VAEConfig):  # conf/model/m2.yaml: autoencoders.models.M2
    num_classes: int | None = MISSING
    alpha: float | None = MISSING
    encoder_ckpt: str | None = MISSING


@dataclass
class ClassifierConfig:  # conf/model/classifier.yaml: autoencoders.models.classifier.Classifier
    _target_: str = MISSING
    num_classes: int | None = MISSING
    encoder_ckpt: str | None = MISSING
    latent_dim: int | None = MISSING
    arch: str | None = MISSING
    widths: list[int] | None = MISSING
    head: str = MISSING
    head_width: int = MISSING
    method: str | None = MISSING
    encoder_lr: float = MISSING
    knn_k: int = MISSING


def gpu_precision() -> str:
    """trainer=gpu's precision: bf16-mixed on GPUs that compute in bf16 (compute capability 8.0, Ampere, and newer),
    where it needs no loss scaling; elsewhere 16-mixed, which Lightning runs with a gradient scaler (bf16 is emulated
    there, slowly)."""
    import torch  # here, not at the top: composing a config must not import torch

    native_bf16 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    return "bf16-mixed" if native_bf16 else "16-mixed"


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    # Root-level names, not options of the data and model groups: --help does not list them and `model=` cannot pick
    # them; each conf/<group>/*.yaml merges its schema in with `defaults: [/<group>_<name>_schema@_here_]`.
    store.store(name="data_schema", node=DataConfig)
    models = {"ae": AEConfig, "vae": VAEConfig, "dae": DAEConfig, "sparse_ae": SparseAEConfig, "wae": WAEConfig}
    models |= {"iwae": IWAEConfig, "beta_tcvae": BetaTCVAEConfig, "vqvae": VQVAEConfig, "classifier": ClassifierConfig}
    models |= {"m2": M2Config, "rae": RAEConfig, "aae": AAEConfig, "info_vae": InfoVAEConfig, "vamp": VampVAEConfig}
    models |= {"vae_iaf": IAFVAEConfig, "hvae": HVAEConfig, "factor_vae": FactorVAEConfig, "fsq": FSQVAEConfig}
    for name, node in models.items():
        store.store(name=f"model_{name}_schema", node=node)
