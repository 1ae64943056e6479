"""Run dirs: `ckpt_path=last` resumes the run in hydra.run.dir, and a new run never writes over an older run's results.

Imported before torch (Hydra instantiates RunDirGuard at start-up), so checkpoints.py is imported only inside functions.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from autoencoders.errors import UserError
from autoencoders.sweeps import exit_with

if TYPE_CHECKING:
    import lightning as L


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def checkpoint_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """`last` is the run dir's checkpoints/last.ckpt; any other value is a path, relative to where you run."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    if not last_checkpoint(run_dir).is_file():
        raise UserError(
            f"ckpt_path=last resumes the run in hydra.run.dir, but {last_checkpoint(run_dir)} does not exist. Name "
            "the run to resume, with the overrides it was started with: python train.py <overrides> "
            "hydra.run.dir=outputs/runs/<run> ckpt_path=last."
        )
    return last_checkpoint(run_dir)


def resumes_in_place(ckpt_path: str | None, run_dir: Path) -> bool:
    """Whether `ckpt_path` continues the run in `run_dir` from its latest state."""
    return ckpt_path == "last" or (
        ckpt_path is not None and Path(ckpt_path).resolve() == last_checkpoint(run_dir).resolve()
    )


def check_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to train in a dir that holds a run's checkpoints or metrics, unless resuming that run's last.ckpt."""
    found = sorted(run_dir.glob("checkpoints/*.ckpt")) + sorted(run_dir.glob("metrics.json"))
    if found and not resumes_in_place(ckpt_path, run_dir):
        raise UserError(
            f"{run_dir} already holds a run ({found[0].relative_to(run_dir)}), and a new run must not overwrite it. "
            "To continue that run, add ckpt_path=last; to start a new one, leave hydra.run.dir at its default (a new "
            "timestamped folder) or choose an unused one. Nothing was changed."
        )


def check_resume_settings(cfg: DictConfig, run_dir: Path) -> None:
    """Resuming in place must keep the run's model and data settings: Hydra rewrites the run's .hydra/config.yaml."""
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file)
    changed = []
    for group in ("model", "data"):
        old, new = (OmegaConf.to_container(c[group], resolve=True) for c in (saved, cfg))
        changed += [f"{group}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in {*old, *new} if old.get(k) != new.get(k)]
    if changed:
        raise UserError(
            f"Resuming {run_dir} with other model or data settings than it was trained with "
            f"({'; '.join(sorted(changed))}) would mix two runs in one folder. Resume with the run's own settings (see "
            f"{saved_file}), or train the new settings as a new run. Nothing was changed."
        )


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, model: "L.LightningModule") -> Path | None:
    """The checkpoint `fit` resumes from, checked to be readable (weights only), this project's, and to fit `model`."""
    from autoencoders.checkpoints import check_fits, read_checkpoint

    path = checkpoint_path(ckpt_path, run_dir)
    if path is not None:
        checkpoint = read_checkpoint(path)
        check_fits(checkpoint, model, path)
        if "optimizer_states" not in checkpoint:
            raise UserError(
                f"ckpt_path={path} holds only model weights (best-*.ckpt files are kept for testing and evaluation), "
                "so training cannot resume from it. Resume from the run's checkpoints/last.ckpt, or load the weights "
                "with autoencoders.load."
            )
    return path


class RunDirGuard(Callback):
    """Hydra callback: checks a single run's dir before Hydra writes .hydra/ into it (train() checks sweep jobs)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        try:
            check_run_dir(run_dir, config.ckpt_path)
            if resumes_in_place(config.ckpt_path, run_dir):
                check_resume_settings(config, run_dir)
                from autoencoders.checkpoints import read_checkpoint  # imports torch: only now that it is needed

                read_checkpoint(checkpoint_path(config.ckpt_path, run_dir))
        except UserError as e:
            exit_with(e)  # Hydra turns an exception raised by a callback into a warning
