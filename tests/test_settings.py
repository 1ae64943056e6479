"""Every setting is checked once, from the range declared beside its type (autoencoders/config.py), before anything is
built or written: each field of every model, data and evaluate config, the top-level keys and the trainer's and
optimizer's keys refuse nan, inf, -1 and a value of another type, naming the key; and the relations between settings,
which no range can state, are refused before training starts."""

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, get_args

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ValidationError
from torch.utils.data import DataLoader, TensorDataset

from autoencoders import config, evaluation, training
from autoencoders.cli import user_error
from autoencoders.console import SPLITS
from autoencoders.errors import UserError
from autoencoders.likelihoods import LIKELIHOODS
from autoencoders.models import VAE
from autoencoders.models.classifier import PRETRAINED
from autoencoders.nets import NETS
from autoencoders.samplers import SAMPLERS
from tests.helpers import ROOT, TINY, compose_train, run_train

CONF = ROOT / "conf"

# Fields not walked, each for its reason.
NOT_WALKED = {
    "_target_": "the class a node builds, not a setting",
    **dict.fromkeys(("ckpt_path", "encoder_ckpt", "run_dir", "sweep_dir", "cache_dir"), "a path: checked when read"),
    "source": "data.source: a Source object with its own arguments, which data/sources.py checks",
    # walked as their own yamls, and the trainer's and optimizer's keys by OPEN_GROUP_RULES (below)
    **dict.fromkeys(("data", "model", "trainer", "logger", "callbacks", "optimizer", "scheduler"), "a config group"),
    "augment": "a config group",
}
# Bad values that a field takes, each with its reason.
ACCEPTED = {
    ("model/info_vae", "model.alpha", "-1"): "alpha <= 1: the KL's weight 1 - alpha is 2, the MMD's stays >= 0",
    ("model/vqvae", "model.ema", "-1"): "OmegaConf reads an integer as a boolean (-1: true) before any check",
    ("train", "compile", "-1"): "OmegaConf reads an integer as a boolean (-1: true) before any check",
    ("train", "trainer.max_steps", "-1"): "Lightning's own default: no step limit",
}


def bad_values(annotation: Any) -> dict[str, Any]:
    """nan, inf, -1 and a value of another type than a field of this type holds (None: an open group's number)."""
    kind = next(iter(set(get_args(annotation) or (annotation,)) - {type(None)}))
    other = {int: "abc", float: "abc", bool: "abc", str: [1], list[int]: ["abc"], list[str]: "abc", None: "abc"}[kind]
    return {"nan": math.nan, "inf": math.inf, "-1": -1, "wrong type": other}


@functools.cache
def composed(yaml: str) -> tuple[DictConfig, DictConfig]:
    """What `python train.py model=<name>` (or data=<name>; or evaluate.py) composes, with and without its hydra node
    (which train.yaml's callbacks read)."""
    name, overrides = "train", []
    if yaml == "evaluate":
        name, overrides = "evaluate", ["run_dir=runs/some_run"]  # one of run_dir, ckpt_path, sweep_dir is required
    elif yaml != "train":
        overrides = [yaml.replace("/", "=")] + (["data.source.root=images"] if yaml == "data/image_folder" else [])
    with initialize_config_dir(str(CONF), version_base="1.3"):
        full = compose(name, overrides, return_hydra_config=True)
    bare = copy.deepcopy(full)
    with open_dict(bare):
        del bare.hydra
    return full, bare


def refusal(yaml: str, settings: dict[str, Any]) -> str | None:
    """The message of the UserError that train.py's (or evaluate.py's) first check raises for the yaml's config with
    `settings` (keys as on the command line), or None if it passes. Hydra's type check raises ValidationError."""
    full, bare = composed(yaml)
    HydraConfig.instance().cfg = full  # as Hydra has it in train.py (its callbacks read ${hydra:runtime.output_dir})
    cfg = copy.deepcopy(bare)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, force_add=True)  # force_add: +trainer.<key> for a key the yaml lacks
    return message_of(lambda: (evaluation.check_config if yaml == "evaluate" else training.check_config)(cfg))


def group_refusal(yaml: str, key: str, value: Any) -> str | None:
    """The same for one field of a model or data yaml, checked as training.check_config checks its group's node (by
    config.check_settings): on a copy of that node alone, which keeps its parent (${latent_dim}), where copying the
    whole config for each case would take seconds."""
    group, _, name = key.partition(".")
    node = copy.deepcopy(composed(yaml)[1][group])
    node[name] = value
    return message_of(lambda: config.check_settings(node, group))


def message_of(check: Callable[[], None]) -> str | None:
    try:
        check()
    except UserError as e:
        return str(e)
    return None


def leaves(node: DictConfig, path: str) -> list[tuple[str, Any]]:
    """(key, type) of every field of the schema-typed `node`, nested schemas' fields too, but NOT_WALKED."""
    found = []
    for f in dataclasses.fields(OmegaConf.get_type(node)):
        key = f"{path}.{f.name}" if path else f.name
        if f.name in NOT_WALKED:
            continue
        found += leaves(node[f.name], key) if dataclasses.is_dataclass(f.type) else [(key, f.type)]  # fid, images
    return found


YAMLS = ["train", "evaluate"] + [f"{g}/{p.stem}" for g in ("model", "data") for p in sorted((CONF / g).glob("*.yaml"))]
YAMLS += ["augment/affine"]  # augment/none has no fields


def fields_of(yaml: str) -> list[tuple[str, Any]]:
    """(key, type) of every field that the yaml sets."""
    cfg, group = composed(yaml)[1], yaml.partition("/")[0] if "/" in yaml else ""
    return leaves(cfg[group] if group else cfg, group)


CASES = [(yaml, key, kind) for yaml in YAMLS for key, kind in fields_of(yaml)]
CASES += [("train", f"{group}.{key}", None) for group, rules in config.OPEN_GROUP_RULES.items() for key in rules]
WALKED = 4 * len(CASES)  # (field, bad value) cases: nan, inf, -1 and a wrong type for each of len(CASES) fields


@pytest.mark.parametrize(("yaml", "key", "kind"), CASES, ids=[f"{yaml}:{key}" for yaml, key, _ in CASES])
def test_every_field_refuses_nan_inf_a_negative_and_a_wrong_type(yaml: str, key: str, kind: Any) -> None:
    for label, value in bad_values(kind).items():
        try:
            message = group_refusal(yaml, key, value) if "/" in yaml else refusal(yaml, {key: value})
        except ValidationError:  # Hydra's type check: `python train.py <key>=<value>` is refused as it composes
            continue
        if (yaml, key, label) in ACCEPTED:
            assert message is None, message
        else:
            assert message is not None, f"{key}={label} passed"
            assert message.startswith(f"{key}=") and "\n" not in message, message  # one paragraph naming the key


def test_the_walk_covers_every_yaml() -> None:
    assert {yaml for yaml, _, _ in CASES} == set(YAMLS) and len(YAMLS) > 20
    print(f"{len(CASES)} fields of {len(YAMLS)} yamls, {WALKED} (field, bad value) cases")  # for the record: pytest -s


ENDS = [  # (yaml, settings, the message's start; None: accepted)
    ("model/vqvae", {"model.commitment": -1}, "model.commitment=-1.0 is negative. Use a weight >= 0, e.g. "
     "model.commitment=0.25."),
    ("model/rae", {"model.decoder_weight": math.nan}, "model.decoder_weight=nan is not finite. Use a weight >= 0, "
     "e.g. model.decoder_weight=1.0e-7."),
    ("model/wae", {"model.mmd_weight": math.nan}, "model.mmd_weight=nan is not finite."),
    ("model/sparse_ae", {"model.sparsity": math.inf}, "model.sparsity=inf is not finite."),
    ("train", {"latent_dim": 0}, "latent_dim=0 is not positive. Use an integer > 0, e.g. latent_dim=16."),
    ("train", {"model.latent_dim": -3}, "model.latent_dim=-3 is negative."),
    ("train", {"kl_weight": -1}, "kl_weight=-1.0 is negative. Use a weight >= 0, e.g. kl_weight=1.0."),
    ("train", {"seed": 2**32}, "seed=4294967296 is too large. Use an integer in [0, 2**32), e.g. seed=0."),
    ("train", {"model.kl_schedule": "cosine"}, "model.kl_schedule=cosine is unknown. Use one of linear, constant"),
    ("train", {"model.kl_cycles": 0}, "model.kl_cycles=0 is not positive."),
    ("train", {"model.arch": "vit"}, "model.arch=vit is unknown. Use one of mlp, conv, resnet, e.g. model.arch=mlp."),
    ("train", {"model.widths": [16, 0]}, "model.widths=[16, 0] holds 0, which is not positive. Use an integer > 0 "
     "for each item"),
    ("model/vae_iaf", {"model.flow_widths": []}, "model.flow_widths=[] has no items."),
    ("model/fsq", {"model.levels": 1}, "model.levels=1 is too small. Use an integer >= 2, e.g. model.levels=5."),
    ("model/vqvae", {"model.decay": 1.0}, "model.decay=1.0 is too large. Use a share in (0, 1)"),
    ("model/info_vae", {"model.alpha": 2}, "model.alpha=2.0 is too large. Use a number <= 1"),
    ("model/classifier", {"model.head": "svm"}, "model.head=svm is unknown. Use one of mlp, linear"),
    ("train", {"data.batch_size": 0}, "data.batch_size=0 is not positive."),
    ("train", {"data.val_fraction": 0.0}, "data.val_fraction=0.0 is not positive. Use a share in (0, 1)"),
    ("train", {"data.test_fraction": 1.0}, "data.test_fraction=1.0 is too large."),
    ("train", {"data.labels_per_class": 0}, "data.labels_per_class=0 is not positive."),
    ("train", {"data.val_labels_per_class": 0}, "data.val_labels_per_class=0 is not positive."),
    ("train", {"data.binarize": "yes"}, "data.binarize=yes is unknown. Use one of dynamic, static"),
    ("train", {"trainer.max_epochs": 2.5}, "trainer.max_epochs=2.5 is not an integer."),
    ("train", {"trainer.max_epochs": -2}, "trainer.max_epochs=-2 is negative. Use an integer > 0 or -1"),
    ("train", {"trainer.val_check_interval": 1.5}, "trainer.val_check_interval=1.5 is too large. Use a number of "
     "batches > 0 or a share in (0, 1]"),
    ("train", {"trainer.accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches=0 is not positive."),
    ("train", {"optimizer.lr": "abc"}, "optimizer.lr=abc is not a number. Use a learning rate > 0"),
    ("evaluate", {"num_samples": 1}, "num_samples=1 is too small. Use an integer >= 2 or 0"),
    ("evaluate", {"data": {"batch_size": 0}}, "data.batch_size=0 is not positive."),  # +data.batch_size=0
    ("evaluate", {"images.steps": 0}, "images.steps=0 is not positive."),
    # the ends of each range, and the values beyond it that mean something
    ("train", {"kl_weight": 0, "seed": 2**32 - 1, "data.labels_per_class": None, "data.device_cap_gb": 0}, None),
    ("model/vqvae", {"model.revive_below": 0, "model.codebook_size": 2, "model.decay": 0.5}, None),
    ("model/fsq", {"model.levels": 2, "model.decoder_warmup_steps": 0}, None),
    ("model/info_vae", {"model.alpha": 1}, None),
    ("train", {"trainer.max_epochs": -1, "trainer.max_steps": 10, "trainer.limit_val_batches": 0}, None),
    ("train", {"trainer.limit_train_batches": 0.5, "trainer.val_check_interval": 1.0}, None),
    ("train", {"trainer.limit_train_batches": 3, "trainer.val_check_interval": 2}, None),
    ("evaluate", {"num_samples": 0, "samplers": ["maf", "two_stage"]}, None),
]  # fmt: skip


@pytest.mark.parametrize(("yaml", "settings", "message"), ENDS, ids=[str(settings) for _, settings, _ in ENDS])
def test_the_ends_of_each_range(yaml: str, settings: dict[str, Any], message: str | None) -> None:
    got = refusal(yaml, settings)
    assert got == message if message is None else got is not None and got.startswith(message), got


def test_declared_choices_are_those_the_code_implements() -> None:
    def choices(schema: type, name: str) -> tuple[str, ...]:
        return next(f.metadata["rule"].choices for f in dataclasses.fields(schema) if f.name == name)

    assert choices(config.AEConfig, "arch") == choices(config.ClassifierConfig, "arch") == tuple(NETS)
    assert choices(config.AEConfig, "likelihood") == tuple(LIKELIHOODS)
    assert choices(config.EvaluateConfig, "samplers") == SAMPLERS
    assert set(choices(config.EvaluateConfig, "split")) == set(SPLITS)
    assert set(PRETRAINED) < set(choices(config.ClassifierConfig, "method"))


def test_train_py_refuses_a_bad_weight_with_one_paragraph_and_leaves_no_run_dir(tmp_path) -> None:
    run = tmp_path / "run"
    proc = run_train("model=vqvae", "model.commitment=-1", "trainer.max_epochs=1", f"hydra.run.dir={run}",
                     cwd=tmp_path, check=False, tiny=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (paragraph,) = proc.stderr.strip().splitlines()
    assert paragraph == "error: model.commitment=-1.0 is negative. Use a weight >= 0, e.g. model.commitment=0.25."
    assert "Traceback" not in proc.stdout and not run.exists()


# The relations between settings, each refused where both values are first known -------------------------------------
def test_a_test_metric_selects_neither_a_sweep_nor_a_sweeper() -> None:
    """objective (train.py's value for a sweeper) and sort_by (evaluate.py's ranking) follow one rule."""
    objective = refusal("train", {"objective": "test/elbo"})
    assert objective == (
        "objective=test/elbo would choose among the runs on the test split. Choose on validation (objective=val/elbo): "
        "the test numbers are reported beside it, and stay unbiased only as long as nothing is chosen on them."
    )
    assert refusal("evaluate", {"sort_by": "test/elbo"}) == objective.replace("objective", "sort_by")
    assert refusal("train", {"objective": "elbo"}).startswith("objective=elbo is no metric of a split.")
    assert refusal("train", {"objective": "val/elbo"}) is None


def test_knn_k_above_the_labelled_images_is_refused_before_training(tmp_path) -> None:
    """1 labelled image per class: 10 in the bank."""
    overrides = ["model=classifier", "model.method=knn", "model.knn_k=11", "data.labels_per_class=1"]
    with pytest.raises(Exception) as raised:
        training.train(compose_train(tmp_path / "run", *TINY, *overrides))
    assert str(user_error(raised.value)).startswith(
        "model.knn_k=11 neighbours would vote, but the k-NN bank holds only the 10 labelled training images. Use "
        "model.knn_k=10 or fewer"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("cycles", "refused"), [(7, True), (6, False)])
def test_kl_cycles_need_two_steps_each(cycles: int, refused: bool) -> None:
    """12 steps: 6 cycles of 2 steps each ramp the weight (0, then the full weight); 7 cannot."""
    loader = DataLoader(TensorDataset(torch.rand(32, 1, 28, 28), torch.zeros(32)), batch_size=8)  # 4 steps an epoch
    model = VAE((1, 28, 28), latent_dim=2, kl_weight=4.0, kl_schedule="cyclic", kl_cycles=cycles)
    betas = []

    class RecordBeta(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(pl_module.kl_beta())

    trainer = L.Trainer(max_epochs=3, callbacks=[RecordBeta()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    if refused:
        with pytest.raises(UserError, match=r"model.kl_cycles=7 cycles in this run's 12 optimizer steps .* Use "
                           r"model.kl_cycles=6 or fewer, or train for at least 14 steps\."):  # fmt: skip
            trainer.fit(model, loader)
        assert betas == []  # before the first step
    else:
        trainer.fit(model, loader)
        assert betas == [0.0, 4.0] * 6


@pytest.mark.parametrize("arch", ["conv", "resnet"])
def test_conv_nets_refuse_no_widths_where_an_mlp_is_one_linear_map(arch: str) -> None:
    with pytest.raises(UserError, match=f"model.widths=\\[\\] gives arch={arch} no stage"):
        VAE((1, 28, 28), latent_dim=2, arch=arch, widths=[])
    assert len(VAE((1, 28, 28), latent_dim=2, arch="mlp", widths=[]).encoder) == 2  # Flatten, Linear
