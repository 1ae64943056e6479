"""The Optuna sweeper of hparams_search=vae_optuna, numbering a resumed study's jobs on from its earlier trials.

Hydra's Optuna sweeper numbers each invocation's jobs from 0, so the second invocation of a study would name its first
trial's folder `0_...` beside the first invocation's `0_...`. Here a job's number is its trial's number in the study.
"""

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumingOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        import optuna  # here, not at the top: Hydra imports every plugin module at each start, and optuna takes 2 s

        impl = self.sweeper
        if impl.storage is not None:  # a study kept in memory starts anew each time
            try:
                impl.job_idx = len(optuna.load_study(study_name=impl.study_name, storage=impl.storage).trials)
            except KeyError:  # optuna's "study not found": a new study
                pass
        return super().sweep(arguments)
