"""The configs' types and every setting's range, declared once, here: the structured configs below, in Hydra's
ConfigStore. Hydra checks every value's type against them when it composes the config, before train.py or evaluate.py
imports torch, and refuses e.g. `latent_dim=abc` or `compile=maybe` naming the key. Each field also declares the values
it may take (`positive`, `weight`, `one_of`, ...: a `Rule`; a float without one must still be finite), and
`check_settings`, the first check of train.py and evaluate.py, holds every value to them before anything is built or
written, with one message that names the key, the value and a fix. What a range cannot say (val_fraction +
test_fraction < 1, knn_k within the labelled images) is checked where the values it relates are first known.

The values themselves, with their comments, live in conf/*.yaml only; each yaml starts from its schema (its defaults
list) and sets every field. Schemas cover the top-level keys and this project's own classes (data, models). The
trainer, logger, callbacks, optimizer and scheduler groups configure Lightning's and torch's classes, which check
their own arguments, and stay open so that any of those arguments can be added (`+trainer.gradient_clip_val=1`); the
ranges of the trainer's and optimizer's keys that this project relies on are declared in OPEN_GROUP_RULES."""

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from autoencoders.errors import UserError


@dataclass(frozen=True)
class Rule:
    """The values one setting may take: a string, one of `choices`; a number (each, in a list), a finite one from
    `low` to `high` (an end left out where `open_low` or `open_high`), or one of `also` (-1: no limit). `example` is a
    good value as typed on the command line, `what` names such a value, and `note` says what is not obvious."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    also: tuple[int, ...] = ()
    choices: tuple[str, ...] = ()
    integer: bool = False  # from the field's type in a schema; the open groups' rules say so themselves
    share: bool = False  # a float is a share of an epoch's batches, in (or from) low to 1; an int, a count
    nonempty: bool = False  # a list needs at least one item
    example: str = ""
    what: str = ""
    note: str = ""

    def check(self, key: str, value: Any) -> None:
        """A UserError, naming `key` as typed on the command line, unless the rule allows `value`."""
        items = list(value) if isinstance(value, ListConfig | list) else None
        if items is None:
            problem, fix = self.problem(value), f"Use {self.allowed()}"
        else:
            wrong = (f"holds {item}, which {problem}" for item in items if (problem := self.problem(item)))
            problem = "has no items" if self.nonempty and not items else next(wrong, "")
            fix = f"Use {self.allowed()} for each item{' (at least one)' * self.nonempty}"
        if problem:
            example = f", e.g. {key}={self.example}" if self.example else ""
            shown = value if items is None else items
            raise UserError(" ".join(filter(None, [f"{key}={shown} {problem}.", f"{fix}{example}.", self.note])))

    def problem(self, value: Any) -> str:
        """What is wrong with one value ("is negative"), or "" if nothing is."""
        if self.choices:
            return "" if value in self.choices else "is unknown"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "is not an integer" if self.integer else "is not a number"
        if self.integer and isinstance(value, float) and not self.share:
            return "is not an integer"
        if not math.isfinite(value):
            return "is not finite"
        if value in self.also:
            return ""
        high = 1 if self.share and isinstance(value, float) else self.high
        if value < self.low or (self.open_low and value == self.low):
            return ("is negative" if value < 0 else "is not positive") if self.low == 0 else "is too small"
        if value > high or (self.open_high and value == high):
            return "is too large"
        return ""

    def allowed(self) -> str:
        """The values allowed, in words: "a weight >= 0", "an integer in [0, 2**32)", "one of mlp, conv, resnet"."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        what = self.what or ("an integer" if self.integer else "a number")
        start = f"{'(' if self.open_low else '['}{_bound(self.low)}"
        if math.isinf(self.low) and math.isinf(self.high):
            words = "a finite number"
        elif math.isinf(self.high):
            words = f"{what} {'>' if self.open_low else '>='} {_bound(self.low)}"
        elif math.isinf(self.low):
            words = f"{what} {'<' if self.open_high else '<='} {_bound(self.high)}"
        else:
            words = f"{what} in {start}, {_bound(self.high)}{')' if self.open_high else ']'}"
        if self.share:
            words += f" or a share in {start}, 1]"
        return " or ".join([words, *map(str, self.also)])


def _bound(number: float) -> str:
    """A range's end as it is best read: 0, 1, 2**32."""
    if isinstance(number, int) and number >= 2**16 and number & (number - 1) == 0:
        return f"2**{number.bit_length() - 1}"
    return f"{number:g}"


FINITE = Rule()  # a float field's without a rule of its own


def _setting(**rule: Any) -> Any:
    """A schema field, required (??? until a yaml sets it), with its rule."""
    return field(default=MISSING, metadata={"rule": Rule(**rule)})


def positive(example: str, **rule: Any) -> Any:
    return _setting(low=0, open_low=True, example=example, **rule)


def non_negative(example: str, **rule: Any) -> Any:
    return _setting(low=0, example=example, **rule)


def weight(example: str) -> Any:
    """A loss term's weight: >= 0."""
    return non_negative(example, what="a weight")


def at_least(low: int, example: str, **rule: Any) -> Any:
    return _setting(low=low, example=example, **rule)


def at_most(high: float, example: str) -> Any:
    return _setting(high=high, example=example)


def fraction(example: str) -> Any:
    """A share strictly between 0 and 1."""
    return _setting(low=0, high=1, open_low=True, open_high=True, example=example, what="a share")


def in_range(low: int, high: int, example: str) -> Any:
    """From low up to, not including, high."""
    return _setting(low=low, high=high, open_high=True, example=example)


def torch_seed() -> Any:
    """A seed that torch's generators accept."""
    return in_range(0, 2**32, example="0")


def one_of(*choices: str, **rule: Any) -> Any:
    """One of `choices`, the first the example."""
    return _setting(choices=choices, **{"example": choices[0], **rule})


ARCHS = ("mlp", "conv", "resnet")  # model.arch: nets.NETS builds each
BINARIZE = ("dynamic", "static")  # data.binarize, or null (grey images)


@dataclass
class TrainConfig:  # conf/train.yaml
    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = MISSING
    augment: Any = None
    optimizer: Any = MISSING
    scheduler: Any = None
    seed: int = torch_seed()
    latent_dim: int = positive("16")
    kl_weight: float = weight("1.0")
    images_every_n_epochs: int = positive("5")
    compile: bool = MISSING
    checkpoint_every_s: float = non_negative("30", what="a number of seconds", note="0 writes after every epoch.")
    ckpt_path: str | None = MISSING
    encoder_ckpt: str | None = MISSING
    objective: str | None = MISSING  # a validation metric: check_chosen_on_validation
    selection: str = one_of(
        "small_val",
        "full_val",
        "none",
        note="small_val: the best checkpoint on as many labelled val images per class as training has; full_val: the "
        "best on the whole val split; none: the last weights.",
    )


@dataclass
class FIDConfig:
    epochs: int = positive("8")
    batch_size: int = positive("64")
    lr: float = positive("5.0e-3", what="a learning rate")
    num_features: int = positive("128")
    seed: int = torch_seed()


@dataclass
class PicturesConfig:
    num_images: int = positive("16")
    num_samples: int = positive("64")
    num_pairs: int = positive("8")
    steps: int = positive("11")
    traversal_dims: int = positive("32")


@dataclass
class DataConfig:  # conf/data/*.yaml: autoencoders.data.ImageDataModule
    _target_: str = MISSING
    source: Any = MISSING  # a Source of data.py, each with its own arguments
    batch_size: int = positive("128")
    val_fraction: float = fraction("0.1")
    test_fraction: float = fraction("0.1")
    labels_per_class: int | None = positive("10")
    val_labels_per_class: int | None = positive("10")
    probe_labels_per_class: int = positive("10")
    split_seed: int = torch_seed()
    seed: int = torch_seed()
    binarize: str | None = one_of(*BINARIZE)
    device_cap_gb: float = non_negative("4", note="0 keeps every split in host memory.")


@dataclass
class AffineConfig:  # conf/augment/affine.yaml: autoencoders.data.augment.Affine
    _target_: str = MISSING
    shift: float = non_negative("2", what="a number of pixels")
    degrees: float = _setting(low=0, high=180, example="10", what="an angle in degrees")
    scale: float = _setting(
        low=0, high=1, open_high=True, example="0.1", note="Size factors lie in [1 - scale, 1 + scale]."
    )


@dataclass
class EvaluateConfig:  # conf/evaluate.yaml
    # data=<name> (a DataConfig), or +data.<key>=<value> overrides of the run's own data config, checked as its keys
    data: Any = field(default=None, metadata={"schema": DataConfig})
    run_dir: str | None = MISSING
    ckpt_path: str | None = MISSING
    sweep_dir: str | None = MISSING
    checkpoint: str = one_of("best", "last")
    split: str = one_of("test", "val")
    seed: int = torch_seed()
    device: str = MISSING  # auto, cpu, cuda, cuda:<index>: evaluation.device
    batch_size: int = positive("100")
    k: int = positive("1000")
    k_chunk: int = positive("100")
    samplers: list[str] = one_of(
        "prior", "gaussian", "gmm", "maf", "iaf", "two_stage", "pixelcnn", example="[prior,gaussian,gmm]"
    )  # samplers.SAMPLERS
    gmm_components: int = positive("10")
    num_samples: int | None = at_least(
        2, also=(0,), example="1000", note="0 skips FID and KID; null: as many samples as the split has images."
    )
    kid_subsets: int = positive("100")
    sort_by: str = MISSING  # a validation metric of metrics.METRICS: evaluation.check_sort_by
    cache_dir: str = MISSING
    fid: FIDConfig = MISSING
    images: PicturesConfig = MISSING


@dataclass
class AEConfig:  # conf/model/ae.yaml, conv_ae.yaml: autoencoders.models.AE
    _target_: str = MISSING
    latent_dim: int = positive("16")
    arch: str = one_of(*ARCHS)
    widths: list[int] | None = positive("[512,256]")  # [] is a plain linear map for mlp; conv and resnet refuse it
    likelihood: str | None = one_of("bernoulli", "continuous_bernoulli", "gaussian", "logistic")


@dataclass
class VAEConfig(AEConfig):  # conf/model/vae.yaml, conv_vae.yaml: autoencoders.models.VAE
    kl_weight: float = weight("1.0")
    kl_schedule: str = one_of("linear", "constant", "cyclic")
    kl_warmup_epochs: int = non_negative("0")
    kl_cycles: int = positive("4")
    nll_samples: int = positive("100")


@dataclass
class DAEConfig(AEConfig):  # conf/model/dae.yaml: autoencoders.models.DAE
    corruption: str = one_of("gaussian", "masking")
    noise: float = non_negative("0.3")


@dataclass
class SparseAEConfig(AEConfig):  # conf/model/sparse_ae.yaml: autoencoders.models.SparseAE
    sparsity: float = weight("3.0")


@dataclass
class WAEConfig(AEConfig):  # conf/model/wae.yaml: autoencoders.models.WAE
    mmd_weight: float = weight("10.0")


@dataclass
class IWAEConfig(AEConfig):  # conf/model/iwae.yaml, miwae.yaml, ciwae.yaml: autoencoders.models.IWAE
    k: int = positive("5")
    m: int = positive("1")
    beta: float = _setting(low=0, high=1, example="0.5", what="a share")
    nll_samples: int = positive("100")


@dataclass
class PIWAEConfig(AEConfig):  # conf/model/piwae.yaml: autoencoders.models.PIWAE
    k: int = positive("8")
    m: int = positive("8")
    nll_samples: int = positive("100")


@dataclass
class BetaTCVAEConfig(VAEConfig):  # conf/model/beta_tcvae.yaml: autoencoders.models.BetaTCVAE
    tc_weight: float = positive("6.0", what="a weight")


@dataclass
class MSSSIMVAEConfig(VAEConfig):  # conf/model/msssim_vae.yaml: autoencoders.models.MSSSIMVAE
    recon_weight: float = positive("1000.0", what="a weight")
    scales: int = _setting(low=1, high=5, example="3", note="Wang et al.'s exponents cover five scales.")
    sigma: float = positive("0.75")


@dataclass
class CapacityVAEConfig(AEConfig):  # conf/model/beta_vae_c.yaml: autoencoders.models.CapacityVAE (no KL weight)
    nll_samples: int = positive("100")
    gamma: float = positive("1000.0", what="a weight")
    capacity: float = non_negative("25.0", what="a number of nats")
    capacity_steps: int = positive("100000")


@dataclass
class VQVAEConfig(AEConfig):  # conf/model/vqvae.yaml: autoencoders.models.VQVAE
    codebook_size: int = at_least(2, "64")
    embedding_dim: int = positive("4")
    commitment: float = weight("0.25")
    ema: bool = MISSING
    decay: float = fraction("0.99")
    codebook_init: str = one_of("kmeans", "random")
    revive_below: float = non_negative("0.01", note="0 never revives a vector.")


@dataclass
class RAEConfig(AEConfig):  # conf/model/rae.yaml, rae_gp.yaml: autoencoders.models.RAE
    embedding_weight: float = weight("1.0e-4")
    decoder_weight: float = weight("1.0e-7")
    decoder_penalty: str = one_of("l2", "gradient")


@dataclass
class AAEConfig(AEConfig):  # conf/model/aae.yaml: autoencoders.models.AAE
    adversarial_weight: float = positive("1.0", what="a weight")
    discriminator_lr: float = positive("1.0e-4", what="a learning rate")
    discriminator_width: int = positive("256")


@dataclass
class InfoVAEConfig(VAEConfig):  # conf/model/info_vae.yaml: autoencoders.models.InfoVAE
    alpha: float = at_most(1, "0.0")  # the KL's weight is 1 - alpha
    mmd_weight: float = weight("10.0")


@dataclass
class VampVAEConfig(VAEConfig):  # conf/model/vamp.yaml: autoencoders.models.VampVAE
    pseudo_inputs: int = positive("50")


@dataclass
class IAFVAEConfig(VAEConfig):  # conf/model/vae_iaf.yaml: autoencoders.models.IAFVAE
    flow_steps: int = positive("2")
    flow_widths: list[int] = positive("[64,64]", nonempty=True)


@dataclass
class NormalizingFlowVAEConfig(VAEConfig):  # conf/model/vae_nf.yaml: autoencoders.models.NormalizingFlowVAE
    flows: list[str] = one_of("planar", "radial", nonempty=True, example="[planar,planar]")


@dataclass
class HypersphericalVAEConfig(VAEConfig):  # conf/model/svae.yaml: autoencoders.models.HypersphericalVAE
    latent_dim: int = at_least(2, "16", note="Its codes lie on the unit sphere in latent_dim dimensions.")


@dataclass
class HamiltonianVAEConfig(VAEConfig):  # conf/model/hamiltonian_vae.yaml: autoencoders.models.HamiltonianVAE
    leapfrog_steps: int = non_negative("5", note="0 with model.beta0=1 is a VAE.")
    step_size: float = positive("0.1")  # below max_step_size: HamiltonianVAE checks it
    max_step_size: float = positive("0.5")
    beta0: float = _setting(low=0, high=1, open_low=True, example="0.5", what="an inverse temperature")


@dataclass
class HVAEConfig(VAEConfig):  # conf/model/hvae.yaml: autoencoders.models.HVAE
    top_latent_dim: int | None = positive("8")
    hidden: int = positive("128")


@dataclass
class FactorVAEConfig(VAEConfig):  # conf/model/factor_vae.yaml: autoencoders.models.FactorVAE
    tc_weight: float = positive("6.0", what="a weight")
    discriminator_lr: float = positive("1.0e-4", what="a learning rate")
    discriminator_width: int = positive("256")


@dataclass
class VAEGANConfig(AEConfig):  # conf/model/vae_gan.yaml: autoencoders.models.VAEGAN (no KL weight)
    nll_samples: int = positive("100")
    gamma: float = positive("1.0", what="a weight")
    discriminator_lr: float = positive("1.0e-4", what="a learning rate")


@dataclass
class FSQVAEConfig(AEConfig):  # conf/model/fsq.yaml: autoencoders.models.FSQVAE
    levels: int = at_least(2, "5")
    decoder_warmup_steps: int = non_negative("100")


@dataclass
class M2Config(VAEConfig):  # conf/model/m2.yaml: autoencoders.models.M2
    num_classes: int | None = positive("10")
    alpha: float = weight("0.1")  # Kingma et al.'s alpha, per image: M2's docstring
    consistency: float = weight("1.0")
    consistency_rampup: int = non_negative("1000", what="a number of steps")
    encoder_ckpt: str | None = MISSING


@dataclass
class ClassifierConfig:  # conf/model/classifier.yaml: autoencoders.models.classifier.Classifier
    _target_: str = MISSING
    num_classes: int | None = positive("10")
    encoder_ckpt: str | None = MISSING
    latent_dim: int | None = positive("16")
    arch: str | None = one_of(*ARCHS)
    widths: list[int] | None = positive("[512,256]")
    head: str = one_of("mlp", "linear")
    head_width: int = positive("128")
    method: str | None = one_of("frozen", "finetune", "linear", "knn", "scratch", "random", "pixels")
    encoder_lr: float = positive("1.0e-4", what="a learning rate")
    knn_k: int = positive("10")


# The open groups' keys that this project relies on (Lightning and torch check them only when the run is built, in
# their own words), by group; a key set to null takes Lightning's default.
OPEN_GROUP_RULES: dict[str, dict[str, Rule]] = {
    "trainer": {
        "max_epochs": Rule(
            low=0, open_low=True, also=(-1,), integer=True, example="50", note="-1: no limit (set trainer.max_steps)."
        ),
        "max_steps": Rule(low=0, open_low=True, also=(-1,), integer=True, example="5000", note="-1: no step limit."),
        "val_check_interval": Rule(low=0, open_low=True, share=True, what="a number of batches", example="1.0"),
        "check_val_every_n_epoch": Rule(low=0, open_low=True, integer=True, example="1"),
        "limit_train_batches": Rule(low=0, share=True, what="a number of batches", example="1.0"),
        "limit_val_batches": Rule(low=0, share=True, what="a number of batches", example="1.0"),
        "limit_test_batches": Rule(low=0, share=True, what="a number of batches", example="1.0"),
        "accumulate_grad_batches": Rule(low=0, open_low=True, integer=True, example="1"),
        "gradient_clip_val": Rule(low=0, example="1.0"),
        "log_every_n_steps": Rule(low=0, integer=True, example="10", note="0: never (and the NaN guard never reads)."),
        "num_nodes": Rule(low=0, open_low=True, integer=True, example="1"),
    },
    "callbacks.ema": {
        "decay": Rule(low=0, high=1, open_high=True, what="the average's share kept at each step", example="0.999"),
    },
    "optimizer": {
        "lr": Rule(low=0, open_low=True, what="a learning rate", example="1.0e-3"),
        "weight_decay": Rule(low=0, example="1.0e-2"),
        "momentum": Rule(low=0, high=1, example="0.9"),
    },
}


def check_settings(node: DictConfig, path: str = "", schema: type | None = None) -> None:
    """Hold every value of a composed config to its rule before anything is built or written: the fields of each node
    typed by a schema here (the top level, data, model, fid, images), and OPEN_GROUP_RULES' keys, each named as typed
    on the command line (model.commitment). A node's own values come before its nested nodes', so that `latent_dim=-4`
    is named so and not as model.latent_dim, which takes its value. Values still ??? are left to the caller; null, where
    a type allows it, is a default. `schema`: the node's, where it has none of its own (evaluate.py's +data.<key>)."""
    schema = OmegaConf.get_type(node) if dataclasses.is_dataclass(OmegaConf.get_type(node)) else schema
    rules, schemas = _rules(schema) if schema else (OPEN_GROUP_RULES.get(path, {}), {})
    # an open group's nodes with rules of their own, such as +callbacks=ema's callbacks.ema
    ruled = [] if schema else [name for name in node if f"{path}.{name}" in OPEN_GROUP_RULES]
    nested = [(node[name], f"{path}.{name}", None) for name in ruled]
    for name, rule in rules.items():
        if name not in node:  # absent, or ???
            continue
        key, value = f"{path}.{name}" if path else name, node[name]
        if isinstance(value, DictConfig):
            nested.append((value, key, schemas.get(name)))
        elif value is not None and (rule or isinstance(value, float)):
            (rule or FINITE).check(key, value)
    for value, key, declared in nested:
        check_settings(value, key, declared)


@functools.cache
def _rules(schema: type) -> tuple[dict[str, Rule | None], dict[str, type]]:
    """Each field's rule (None: none declared; an int field's counts in integers), and the schema declared for a
    field typed Any."""
    rules, schemas = {}, {}
    for f in dataclasses.fields(schema):
        rule = f.metadata.get("rule")
        rules[f.name] = rule and dataclasses.replace(rule, integer=_integers(f.type))
        if "schema" in f.metadata:
            schemas[f.name] = f.metadata["schema"]
    return rules, schemas


def _integers(annotation: Any) -> bool:
    """Whether a field of this type holds integers: int, int | None, list[int], list[int] | None."""
    return any(t is int or get_args(t) == (int,) for t in get_args(annotation) or (annotation,))


def check_chosen_on_validation(key: str, metric: str, example: str) -> None:
    """A metric that chooses among runs (evaluate.py's sort_by, a sweeper's objective) must be a validation one: the
    test numbers stay unbiased only as long as nothing is chosen on them."""
    split, _, name = metric.partition("/")
    if split == "val" and name:
        return
    if not name:
        raise UserError(f"{key}={metric} is no metric of a split. Use a validation metric, e.g. {key}={example}.")
    raise UserError(
        f"{key}={metric} would choose among the runs on the {split} split. Choose on validation ({key}=val/{name}): "
        "the test numbers are reported beside it, and stay unbiased only as long as nothing is chosen on them."
    )


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
    store.store(name="augment_affine_schema", node=AffineConfig)
    models = {"ae": AEConfig, "vae": VAEConfig, "dae": DAEConfig, "sparse_ae": SparseAEConfig, "wae": WAEConfig}
    models |= {"iwae": IWAEConfig, "beta_tcvae": BetaTCVAEConfig, "vqvae": VQVAEConfig, "classifier": ClassifierConfig}
    models |= {"m2": M2Config, "rae": RAEConfig, "aae": AAEConfig, "info_vae": InfoVAEConfig, "vamp": VampVAEConfig}
    models |= {"vae_iaf": IAFVAEConfig, "hvae": HVAEConfig, "factor_vae": FactorVAEConfig, "fsq": FSQVAEConfig}
    models |= {"beta_vae_c": CapacityVAEConfig, "vae_nf": NormalizingFlowVAEConfig, "piwae": PIWAEConfig}
    models |= {"msssim_vae": MSSSIMVAEConfig, "hamiltonian_vae": HamiltonianVAEConfig, "vae_gan": VAEGANConfig}
    models |= {"svae": HypersphericalVAEConfig}
    for name, node in models.items():
        store.store(name=f"model_{name}_schema", node=node)
