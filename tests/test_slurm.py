"""train.py beside SLURM's commands (Debian's slurm-wlm; skipped where they are not installed)."""

import shutil

import pytest

from tests.helpers import run_train

needs_slurm = pytest.mark.skipif(shutil.which("srun") is None, reason="needs SLURM (apt-get install slurm-wlm munge)")


@needs_slurm
def test_a_run_that_slurm_did_not_start_says_nothing_of_srun_on_a_machine_that_has_it(tmp_path):
    proc = run_train("model=ae", "latent_dim=2", "hydra.run.dir=run", cwd=tmp_path)
    assert "`srun` command" not in proc.stdout + proc.stderr  # Lightning's hint: for processes SLURM started
