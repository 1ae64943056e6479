"""The optimizer and learning-rate schedule a LightningModule builds from conf/optimizer and conf/scheduler.

Both are `_partial_` configs: the optimizer is called with the module's parameter groups, the schedule with that
optimizer. Settings that depend on the run are left null in the configs and filled here: `total_steps` with the
run's optimizer steps, and a `monitor`/`mode` with the model's validation selection metric (e.g. val/elbo, max)."""

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

OptimizerFactory = Callable[[Iterable], Optimizer]
default_optimizer: OptimizerFactory = partial(torch.optim.Adam, lr=1e-3, fused=True)  # conf/optimizer/adam.yaml


def run_values(settings: Mapping[str, Any], **values: Any) -> dict[str, Any]:
    """Those of `values` whose key `settings` (a config, or a partial's keywords) has and leaves null: the settings
    that the run fills in (monitor, mode, total_steps)."""
    return {k: v for k, v in values.items() if k in settings and settings[k] is None}


def configure_optimizers(
    make_optimizer: OptimizerFactory,
    schedule: dict[str, Any] | None,
    parameters: Iterable,
    total_steps: int | float,
    selection: tuple[str, str],
) -> Optimizer | dict[str, Any]:
    """What `LightningModule.configure_optimizers` returns: the optimizer, and Lightning's lr_scheduler config
    (`scheduler`, `interval`, `frequency`, `monitor`) when `schedule` is one."""
    optimizer = make_optimizer(parameters)
    if schedule is None:
        return optimizer
    monitor, mode = selection
    make_schedule = schedule["scheduler"]
    scheduler = make_schedule(optimizer, **run_values(make_schedule.keywords, total_steps=int(total_steps), mode=mode))
    lr_scheduler = {**schedule, "scheduler": scheduler, "monitor": schedule.get("monitor") or monitor}
    return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}


def cosine_with_warmup(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05) -> LRScheduler:
    """A linear warm-up from 1% of the learning rate over `warmup_fraction` of `total_steps`, then cosine decay to 0:
    torch's LinearLR followed by CosineAnnealingLR."""
    warmup = max(1, round(warmup_fraction * total_steps))
    ramp = LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    decay = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
