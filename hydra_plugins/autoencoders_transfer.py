"""The transfer study's sweeper (conf/hydra/sweeper/transfer.yaml, which experiment=transfer selects). It lives here
because Hydra instantiates sweepers only from the hydra_plugins package; the study itself is autoencoders/transfer.py.
"""

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import open_dict

from autoencoders.cli import exit_with
from autoencoders.files import remove, written
from autoencoders.jobs import job_status
from autoencoders.transfer import JOBS_DIR, PRETRAIN_DIR, check_unseen, pretrained_checkpoint, pretraining_overrides


class TransferSweeper(BasicSweeper):
    """The basic sweeper, after jobs of the configured launcher have pretrained one encoder per seed into
    <sweep dir>/pretrain/seed-<seed>: under hydra/launcher=slurm the pretraining jobs are SLURM jobs like the
    classifiers. So the spread over seeds includes the pretraining's.

    Each such job is `python train.py <the command line's SHARED overrides> <pretrain> seed=<seed>` (not
    experiment=transfer), so `data=fashion_mnist`, `latent_dim=32` or `trainer=gpu` apply to the whole study. Every
    classifier job then gets its own seed's last.ckpt as encoder_ckpt.
    """

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, pretrain: Sequence[str] = ()):
        super().__init__(max_batch_size, params)
        self.pretrain = list(pretrain)

    def sweep(self, arguments: list[str]) -> Any:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        seeds = self._seeds(arguments)
        encoder_ckpt = pretrained_checkpoint(sweep_dir, "${seed}")  # resolved in each job, to its own seed's
        arguments = [f"encoder_ckpt='{encoder_ckpt}'", *arguments]  # a command-line encoder_ckpt wins
        self._check_classifiers(arguments)
        self._pretrain(arguments, sweep_dir, seeds)
        for seed in seeds:
            check_unseen(self.config, pretrained_checkpoint(sweep_dir, seed))
        for name in written(sweep_dir / JOBS_DIR):  # this invocation's jobs record themselves anew
            remove(sweep_dir / JOBS_DIR / name)
        return super().sweep(arguments)

    def _seeds(self, arguments: Sequence[str]) -> list[int]:
        """The seeds of the classifier jobs: the last `seed` of the sweep's params and the command line."""
        seeds = [self.config.seed]
        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        for override in OverridesParser.create().parse_overrides([*params, *arguments]):
            if override.key_or_group == "seed":
                values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
                seeds = [int(v) for v in values]
        return seeds

    def _check_classifiers(self, arguments: Sequence[str]) -> None:
        """Refuse, before any pretraining, a study with a classifier job that train.py would refuse: compose each job's
        config as the launcher will and run train.py's checks of it (transfer.check_classifier)."""
        from autoencoders.errors import UserError
        from autoencoders.transfer import check_classifier

        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        (jobs,) = self.split_arguments(parser.parse_overrides([*params, *arguments]), max_batch_size=None)
        hydra_config = HydraConfig.instance()
        for job in jobs:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
            with open_dict(cfg):  # as the launcher sets it, the job's dir (${hydra:runtime.output_dir}: a logger's)
                cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir))
            study = hydra_config.cfg
            hydra_config.set_config(cfg)
            try:
                with open_dict(cfg):
                    del cfg.hydra  # what train.py gets
                check_classifier(cfg)
            except UserError as e:
                shown = " ".join(o for o in job if not o.startswith(("encoder_ckpt=", "hydra.", "hydra/")))
                exit_with(
                    UserError(
                        f"the transfer study's classifier job {shown} would fail, so the study stops before any "
                        f"pretraining: {e}"
                    )
                )
            finally:
                hydra_config.cfg = study

    def _pretrain(self, arguments: Sequence[str], sweep_dir: Path, seeds: Sequence[int]) -> None:
        shared = [
            *pretraining_overrides(arguments),
            *self.pretrain,
            # the study's hydra settings that the jobs need, as they are composed without experiment=transfer: this
            # sweeper (the launcher gives every job the command line's hydra.* overrides, hydra.sweeper.pretrain too),
            # the mode (a sweep job records its failure, and is skipped or resumed when the study is run again) and
            # the sweep dir
            f"hydra/sweeper={self.config.hydra.runtime.choices['hydra/sweeper']}",
            "hydra.mode=MULTIRUN",
            f"hydra.sweep.dir='{sweep_dir}'",
        ]
        jobs = [[*shared, f"seed={seed}", f"hydra.sweep.subdir={PRETRAIN_DIR}/seed-{seed}"] for seed in seeds]
        try:
            self.validate_batch_is_legal(jobs)
        except HydraException as e:
            sys.exit(
                f"error: the pretraining jobs' overrides ({' '.join(shared)}) do not compose: "
                f"{str(e).splitlines()[0].rstrip('.')}. Fix hydra.sweeper.pretrain, which holds train.py overrides."
            )
        print(f"transfer study: pretraining one encoder per seed ({', '.join(map(str, seeds))}) as jobs of the "
              f"launcher: {' '.join(shared)}", flush=True)  # fmt: skip
        try:
            returns = self.launcher.launch(jobs, initial_job_idx=0)
        except Exception as e:  # a launcher that lost its jobs (e.g. ones that SLURM cancelled)
            sys.exit(f"error: pretraining the encoders failed, so the study stops before any classifier trains: "
                     f"{type(e).__name__}: {e}")  # fmt: skip
        for seed, job in zip(seeds, returns, strict=True):
            run_dir = sweep_dir / PRETRAIN_DIR / f"seed-{seed}"
            try:
                value = job.return_value  # raises what the job raised
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if value is not None:
                    continue
                reason = str(job_status(run_dir))  # train.py's record of its failure, or how it stopped
            sys.exit(
                f"error: pretraining the encoder for seed {seed} failed, so the study stops before any classifier "
                f"trains: {reason} (its log: {run_dir / 'train.log'})"
            )
